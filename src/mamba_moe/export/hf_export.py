"""``mamba-moe export hf``: a checkpoint -> a transformers-native ``GraniteMoeHybridForCausalLM`` directory.

``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it with no
remote code, and so do the tools built on them (``generate``, lm-evaluation-harness ``--model hf``, PEFT,
vLLM's GraniteMoeHybrid). Weights are written under the on-disk names of IBM's Granite-4.0-H checkpoints
(``block_sparse_moe.input_linear`` = cat(gate, up), ``output_linear``, ``router.layer``), which transformers
5 renames on load and which older transformers and vLLM read as they are.

Where transformers' implementation cannot express a config exactly, ``hf_blockers`` refuses it with the
reason instead of writing a near miss. Facts checked against transformers 5.24's
``modeling_granitemoehybrid.py``:

- the gated norm is per group (``group_size = d_inner / n_groups``), as ours, so any ``ssm_ngroups`` fits;
- ``time_step_limit`` defaults to (0, inf), no clamp, as ours;
- YaRN (``modeling_rope_utils._compute_yarn_parameters``) is our formula, betas and ``attention_factor`` read
  from ``rope_parameters``; RoPE is rotate-half as ours (no q/k permutation); ``position_embedding_type``
  must be ``"rope"`` or RoPE is silently dropped;
- the attention score scale is ``attention_multiplier`` (written 1/sqrt(head_dim); its default 1.0 is wrong);
  ``head_dim`` must be written when d_model / heads differs from it (diff2 exports as 2h heads);
- one activation (``hidden_act``) serves the Mamba conv and every MLP: SwiGLU only;
- every layer has a ``shared_mlp``: our shared expert, or the dense FFN when there are no experts; a MoE
  model without a shared expert gets an all-zero one (exactly 0 on every token) of width ``ZERO_SHARED_WIDTH``;
- the router is softmax over the top-k logits (= our renormalised top-k; soft = all experts).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_directory
from ..config import MambaMoEConfig
from ..ops.diff_attention import fold_diff2_output_projection
from .errors import ExportError
from .granite_rules import ExportBlocker

ZERO_SHARED_WIDTH = 64

HF_RULES: dict[str, str] = {
    "ffn_uniform": "Every layer needs the same FFN kind, all 'moe' or all 'dense' (GraniteMoeHybrid decides MoE "
                   "once per model and gives every layer an MLP).",
    "ffn_activation": "FFNs must use swiglu (GraniteMoeHybrid's hidden_act serves the Mamba conv and every MLP).",
    "moe_router": "The 'switch' router (capacity dropping, raw top-1 probability) has no transformers equivalent.",
    "attn_type": "attn_type 'diff' (per-head RMSNorm) has no GraniteMoeHybrid equivalent.",
    "diff2_lambda": "diff2_lambda 'token' cannot be folded into a fixed output projection.",
}


def hf_blockers(config: MambaMoEConfig) -> list[ExportBlocker]:
    """Every reason ``config`` cannot be written as a GraniteMoeHybrid checkpoint; empty if it can."""
    out: list[ExportBlocker] = []
    ffns = set(config.layer_ffns)
    if len(ffns) != 1 or "none" in ffns:
        out.append(ExportBlocker("ffn_uniform", f"layer_ffns uses {sorted(ffns)}; GraniteMoeHybrid needs every "
                                 "layer 'moe' or every layer 'dense'"))
    if config.ffn_activation != "swiglu":
        out.append(ExportBlocker("ffn_activation", f"ffn_activation is {config.ffn_activation!r}; "
                                 "GraniteMoeHybrid's MLPs are SwiGLU (hidden_act silu)"))
    if "moe" in ffns and config.moe_router == "switch":
        out.append(ExportBlocker("moe_router", "moe_router 'switch' drops tokens over capacity and scales by the raw "
                                 "top-1 probability; transformers renormalises the top k"))
    if "attention" in config.layer_mixers:
        if config.attn_type == "diff":
            out.append(ExportBlocker("attn_type", "attn_type 'diff' normalises each head with its own RMSNorm, "
                                     "which GraniteMoeHybrid's attention has not"))
        if config.attn_type == "diff2" and config.diff2_lambda == "token":
            out.append(ExportBlocker("diff2_lambda", "diff2_lambda 'token' computes lambda per token; it cannot be "
                                     "folded into o_proj"))
    return out


def hf_config(config: MambaMoEConfig) -> dict[str, Any]:
    """config.json of the GraniteMoeHybrid checkpoint."""
    moe = config.layer_ffns[0] == "moe"
    q_heads = 2 * config.attn_num_heads if config.attn_type == "diff2" else config.attn_num_heads
    if config.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    else:
        rs = config.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(rs["factor"]),
                "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
                "beta_fast": float(rs.get("beta_fast", 32.0)), "beta_slow": float(rs.get("beta_slow", 1.0))}
        if rs.get("attention_factor") is not None:
            rope["attention_factor"] = float(rs["attention_factor"])
    shared = (config.moe_shared_expert_hidden_size or ZERO_SHARED_WIDTH) if moe else config.ffn_hidden_size
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "layer_types": ["mamba" if m == "mamba" else "attention" for m in config.layer_mixers],
        "num_attention_heads": q_heads,
        "num_key_value_heads": config.attn_num_kv_heads,
        "head_dim": config.head_dim,
        "attention_multiplier": 1.0 / math.sqrt(config.head_dim),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "position_embedding_type": "rope",
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": float(config.rms_norm_eps),
        "hidden_act": "silu",
        "intermediate_size": config.moe_expert_hidden_size if moe else config.ffn_hidden_size,
        "num_local_experts": config.moe_num_experts if moe else 0,
        "num_experts_per_tok": config.effective_top_k if moe else 0,
        "shared_intermediate_size": shared,
        "mamba_n_heads": config.ssm_num_heads,
        "mamba_n_groups": config.ssm_ngroups,
        "mamba_d_state": config.ssm_state_size,
        "mamba_d_head": config.ssm_head_dim,
        "mamba_d_conv": config.ssm_conv_kernel,
        "mamba_expand": config.ssm_expand,
        "mamba_chunk_size": config.ssm_chunk_size,
        "mamba_conv_bias": config.ssm_conv_bias,
        "mamba_proj_bias": False,
        "embedding_multiplier": 1.0,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": "float32",
    }


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under GraniteMoeHybrid's on-disk names (contiguous fp32 CPU tensors)."""
    config = model.config
    out: dict[str, Tensor] = {}

    def put(name: str, t: Tensor) -> None:
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()

    with torch.no_grad():
        put("model.embed_tokens.weight", model.embed.full_table())
        put("model.norm.weight", model.backbone.final_norm.weight)
        if model.lm_head is not None:
            put("lm_head.weight", model.lm_head.weight)
        for i, layer in enumerate(model.backbone.layers):
            p = f"model.layers.{i}"
            put(f"{p}.input_layernorm.weight", layer.mixer_norm.weight)
            put(f"{p}.post_attention_layernorm.weight", layer.ffn_norm.weight)
            m = layer.mixer
            if layer.mixer_kind == "mamba":
                for name in ("in_proj.weight", "conv1d.weight", "out_proj.weight", "norm.weight"):
                    put(f"{p}.mamba.{name}", m.get_parameter(name))
                if m.conv1d.bias is not None:
                    put(f"{p}.mamba.conv1d.bias", m.conv1d.bias)
                for name in ("dt_bias", "A_log", "D"):
                    put(f"{p}.mamba.{name}", getattr(m, name))
            else:
                o_proj = m.o_proj.weight
                if m.kind == "diff2":
                    o_proj = fold_diff2_output_projection(o_proj.float(), torch.sigmoid(m.diff_lambda.float()),
                                                          m.head_dim)
                for name, t in (("q_proj", m.q_proj.weight), ("k_proj", m.k_proj.weight),
                                ("v_proj", m.v_proj.weight), ("o_proj", o_proj)):
                    put(f"{p}.self_attn.{name}.weight", t)
            f = layer.ffn
            if layer.ffn_kind == "moe":
                put(f"{p}.block_sparse_moe.router.layer.weight", f.router.weight)
                put(f"{p}.block_sparse_moe.input_linear.weight",
                    torch.cat([f.experts.gate_proj, f.experts.up_proj], dim=1))
                put(f"{p}.block_sparse_moe.output_linear.weight", f.experts.down_proj)
                shared = f.shared_expert
                if shared is None:   # transformers always runs shared_mlp: zero weights add exactly 0
                    put(f"{p}.shared_mlp.input_linear.weight", torch.zeros(2 * ZERO_SHARED_WIDTH, config.d_model))
                    put(f"{p}.shared_mlp.output_linear.weight", torch.zeros(config.d_model, ZERO_SHARED_WIDTH))
                    continue
            else:
                shared = f                           # the dense FFN is GraniteMoeHybrid's shared_mlp
            put(f"{p}.shared_mlp.input_linear.weight", torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            put(f"{p}.shared_mlp.output_linear.weight", shared.down_proj.weight)
    return out


def generation_config(config: MambaMoEConfig, tokenizer: Any) -> dict[str, Any]:
    """Generation stops at <|endoftext|> and at <|im_end|> (the end of a chat turn)."""
    from ..data.tokenizer import IM_END

    eos = [config.eos_token_id] if config.eos_token_id is not None else []
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None and im_end not in eos:
        eos.append(im_end)
    return {"bos_token_id": None, "eos_token_id": eos or None, "pad_token_id": config.pad_token_id}


@dataclass
class HFExportReport:
    path: Path
    tensors: int
    parameters: int


def export_hf(checkpoint: str | os.PathLike, output: str | os.PathLike) -> HFExportReport:
    """Write ``checkpoint`` as a GraniteMoeHybridForCausalLM directory at ``output`` (replaced atomically)."""
    from safetensors.torch import save_file

    from ..checkpoint_dirs import CheckpointError, resolve_model_dir
    from ..data.tokenizer import load_tokenizer
    from ..model.lm import CONFIG_NAME, WEIGHTS_NAME, MambaMoEForCausalLM

    try:  # the one judge of a complete checkpoint: a step dir, or a run folder's newest complete step
        path = resolve_model_dir(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    out = Path(output)
    if not (path / "tokenizer.json").exists():
        raise ExportError(f"{path / 'tokenizer.json'}: missing; `export hf` needs {CONFIG_NAME}, {WEIGHTS_NAME} and "
                          "the tokenizer saved beside them")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; -o names the directory to write")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: cannot write there: {probe} is not a writable directory")
    config = MambaMoEConfig.load(path / CONFIG_NAME)
    blockers = hf_blockers(config)
    if blockers:
        raise ExportError(f"{path / CONFIG_NAME}: cannot be written as transformers GraniteMoeHybrid:\n"
                          + "\n".join(f"  - {b}" for b in blockers))
    tokenizer = load_tokenizer(path)
    model = MambaMoEForCausalLM.from_pretrained(path).eval()
    state = hf_state_dict(model)
    for name, t in state.items():
        if not torch.isfinite(t).all():
            raise ExportError(f"{name}: contains NaN or Inf values")
    if config.tie_word_embeddings:  # tied: transformers ties lm_head to embed_tokens on load
        state.pop("lm_head.weight", None)
    try:
        with atomic_directory(out) as tmp:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(
                json.dumps(generation_config(config, tokenizer), indent=2) + "\n")
            tokenizer.save_pretrained(str(tmp))
    except OSError as err:
        raise ExportError(f"{out}: cannot write: {err}") from err
    return HFExportReport(out, len(state), int(sum(t.numel() for t in state.values())))
