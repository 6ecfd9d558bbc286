"""``mamba-moe export gguf``: a checkpoint directory -> one GGUF file for stock llama.cpp (``granitehybrid``).

The file is written with the ``gguf`` package's ``GGUFWriter``, not HF's converter: for GraniteMoeHybrid the
converter writes ``rope.scaling.finetuned = false``, which in llama.cpp's granitehybrid is the switch that
turns RoPE off. Quantized types are made from an f32 file by llama.cpp's own quantizer (``llama_quant``).
The output appears whole or not at all (``atomic.atomic_file``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import TMP_MARK, atomic_file
from ..config import MambaMoEConfig
from .errors import ExportError
from .gguf_tensors import GGUFTensor, gguf_tensors
from .gguf_vocab import GGUFVocab, gguf_vocab, write_vocab
from .granite_rules import export_blockers
from .llama_quant import FILE_TYPES, FileType, check_quant_type, file_type, import_llama_cpp, llama_quantize

ARCH = "granitehybrid"


@dataclass
class GGUFMetadata:
    """The architecture and its keys, as (GGUFWriter method, value) pairs in writing order."""

    arch: str
    entries: list[tuple[str, Any]]


def gguf_architecture(config: MambaMoEConfig) -> str:
    """``granitehybrid``; ``granite`` for a model without Mamba2 layers.

    llama.cpp's granitehybrid allocates a recurrent-state buffer for its SSM layers and aborts
    (``GGML_ASSERT(buffer)``) when there are none; its ``granite`` graph is the same attention / FFN / MoE
    code without the SSM part (HF's converter makes the same switch).
    """
    return ARCH if "mamba" in config.layer_mixers else "granite"


def gguf_metadata(config: MambaMoEConfig) -> GGUFMetadata:
    """Every architecture key llama.cpp's loader reads for this model (``llama_model_base::load_hparams`` and
    ``llama_model_granite_hybrid::load_arch_hparams`` / ``llama_model_granite::load_arch_hparams``).

    Not written, so llama.cpp's defaults (off) apply: ``residual_scale``, ``embedding_scale``,
    ``attention.scale`` (the score scale is then 1/sqrt(key_length), as ours) and ``rope.scaling.attn_factor``
    (llama.cpp then applies YaRN's 0.1 ln(s) + 1, as ours). ``logit_scale`` is left out for granitehybrid
    (optional there, off) and written as 1.0 for granite, which requires it (logits are divided by it).
    """
    gguf = import_gguf()
    arch = gguf_architecture(config)
    mamba_layers = [m == "mamba" for m in config.layer_mixers]
    moe = config.layer_ffns[0] == "moe"
    # diff2 (per-head lambda) exports as plain GQA with 2h query heads of width head_dim.
    q_heads = 2 * config.attn_num_heads if config.attn_type == "diff2" else config.attn_num_heads
    e: list[tuple[str, Any]] = [
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.d_model),
        ("add_block_count", config.n_layers),
        ("add_feed_forward_length", config.moe_expert_hidden_size if moe else config.ffn_hidden_size),
        ("add_layer_norm_rms_eps", float(config.rms_norm_eps)),   # one epsilon for every norm, as in our config
        # Attention: one head count for the model; head_count_kv per layer, 0 marks a Mamba2 layer.
        ("add_head_count", q_heads),
        ("add_head_count_kv", [0 if is_mamba else config.attn_num_kv_heads for is_mamba in mamba_layers]),
        # Needed whenever d_model / heads is not the head width (diff2's 2h heads, explicit attn_head_dim).
        ("add_key_length", config.head_dim),
        ("add_value_length", config.head_dim),
        ("add_rope_dimension_count", config.head_dim),
        ("add_rope_freq_base", float(config.rope_theta)),
        # In granitehybrid this is RoPE's on/off switch; HF's converter writes false for Granite-4.0-H.
        ("add_rope_scaling_finetuned", True),
    ]
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        e += [("add_rope_scaling_type", gguf.RopeScalingType.YARN),
              ("add_rope_scaling_factor", float(rs["factor"])),
              ("add_rope_scaling_orig_ctx_len", int(rs["original_max_position_embeddings"]))]
    else:
        e.append(("add_rope_scaling_type", gguf.RopeScalingType.NONE))
    if arch == ARCH:
        e += [
            ("add_ssm_conv_kernel", config.ssm_conv_kernel),
            ("add_ssm_inner_size", config.ssm_d_inner),
            ("add_ssm_state_size", config.ssm_state_size),
            ("add_ssm_time_step_rank", config.ssm_num_heads),   # llama.cpp's name for the number of SSM heads
            ("add_ssm_group_count", config.ssm_ngroups),
        ]
    else:
        e.append(("add_logit_scale", 1.0))                     # required by granite; logits are divided by it
    if moe:
        # llama.cpp routes softmax -> top k -> renormalise: our topk, and soft with k = all experts.
        e += [("add_expert_count", config.moe_num_experts),
              ("add_expert_used_count", config.effective_top_k)]
        if config.moe_shared_expert_hidden_size:
            e.append(("add_expert_shared_feed_forward_length", config.moe_shared_expert_hidden_size))
    return GGUFMetadata(arch, e)


def _check_output(path: Path) -> None:
    """Fail before any work if ``path`` cannot become a file."""
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; -o needs a file name such as {path / 'model.gguf'}")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"{path}: cannot write there: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: cannot write there: {probe} is not writable")


def load_for_export(checkpoint: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint directory, after the export rules; errors name the file or rule."""
    from ..checkpoint_dirs import CheckpointError, resolve_model_dir
    from ..data.tokenizer import load_tokenizer
    from ..model.lm import CONFIG_NAME, MambaMoEForCausalLM

    try:  # the one judge of a complete checkpoint: a step dir, or a run folder's newest complete step
        path = resolve_model_dir(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    config = MambaMoEConfig.load(path / CONFIG_NAME)
    blockers = export_blockers(config)
    if blockers:
        raise ExportError(f"{path / CONFIG_NAME}: cannot be exported to llama.cpp granitehybrid:\n"
                          + "\n".join(f"  - {b}" for b in blockers))
    if not (path / "tokenizer.json").exists():
        raise ExportError(f"{path / 'tokenizer.json'}: missing; the GGUF file carries the tokenizer, so the "
                          "checkpoint needs its tokenizer saved beside the weights")
    tokenizer = load_tokenizer(path)
    model = MambaMoEForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ExportError("GGUF export needs the 'gguf' package (pip install 'mamba-moe[export]')") from err
    return gguf


def write_gguf_file(path: Path, config: MambaMoEConfig, vocab: GGUFVocab, tensors: list[GGUFTensor],
                    kind: FileType, name: str) -> None:
    """Write one GGUF file at ``path`` (not atomic: callers pass a temporary name)."""
    gguf = import_gguf()

    metadata = gguf_metadata(config)
    writer = gguf.GGUFWriter(str(path), metadata.arch)
    try:
        writer.add_name(name)
        writer.add_file_type(kind.llama_ftype)
        for method, value in metadata.entries:
            getattr(writer, method)(value)
        write_vocab(writer, vocab)
        for t in tensors:
            data = t.data
            if t.is_matrix and kind.name == "f16":
                writer.add_tensor(t.name, data.astype(np.float16))
            elif t.is_matrix and kind.name == "bf16":
                writer.add_tensor(t.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


@dataclass
class ExportReport:
    path: Path
    type: str
    bytes: int
    tensors: int
    parameters: int
    seconds: float


def export_gguf(checkpoint: str | os.PathLike, output: str | os.PathLike, type: str = "f32",
                threads: int = 0) -> ExportReport:
    """Export ``checkpoint`` to ``output`` (``type``: see ``llama_quant.FILE_TYPES``); returns what was written."""
    start = time.perf_counter()
    kind = file_type(type)
    import_gguf()
    out = Path(output)
    _check_output(out)
    model, tokenizer = load_for_export(checkpoint)
    config = model.config
    tensors = gguf_tensors(model)
    check_quant_type(tensors, kind)
    vocab = gguf_vocab(tokenizer, config.vocab_size, config.eos_token_id, config.pad_token_id)
    if not kind.native:
        import_llama_cpp()  # fail now, not after the f32 file is written
    name = Path(checkpoint).resolve().name
    try:
        with atomic_file(out) as tmp:
            if kind.native:
                write_gguf_file(tmp, config, vocab, tensors, kind, name)
            else:
                scratch = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{out.name}-", dir=out.parent))
                try:
                    f32 = scratch / "model-f32.gguf"
                    write_gguf_file(f32, config, vocab, tensors, FILE_TYPES["f32"], name)
                    llama_quantize(f32, tmp, kind, threads)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    except OSError as err:
        raise ExportError(f"{out}: cannot write: {err}") from err
    return ExportReport(path=out, type=kind.name, bytes=out.stat().st_size, tensors=len(tensors),
                        parameters=int(sum(t.data.size for t in tensors)), seconds=time.perf_counter() - start)

