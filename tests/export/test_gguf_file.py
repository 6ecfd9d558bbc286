"""The GGUF file itself, read back with the ``gguf`` package (no llama.cpp needed): metadata, tensors, types,
and the errors of bad input. The logits parity against llama.cpp is in test_gguf_llama_cpp.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mamba_moe.atomic import TMP_MARK  # noqa: E402
from mamba_moe.export import gguf_export  # noqa: E402
from mamba_moe.export.errors import ExportError  # noqa: E402
from mamba_moe.export.gguf_export import export_gguf  # noqa: E402
from mamba_moe.export.gguf_tensors import permute_rope_rows  # noqa: E402
from mamba_moe.export.gguf_vocab import gguf_vocab  # noqa: E402
from mamba_moe.model.lm import MambaMoEForCausalLM  # noqa: E402
from mamba_moe.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402


def fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return kv, tensors


def test_flagship_shaped_metadata_and_tensors(make_checkpoint, seed, tmp_path):
    ckpt = make_checkpoint("flagship", seed)
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpt, out)
    model = MambaMoEForCausalLM.from_pretrained(ckpt)
    c = model.config
    kv, tensors = fields(out)
    a = "granitehybrid."
    assert kv["general.architecture"] == "granitehybrid"
    assert kv[a + "attention.head_count_kv"] == [0, 0, 1, 0]          # 0 marks the Mamba2 layers
    assert kv[a + "attention.head_count"] == 2 * c.attn_num_heads     # diff2 -> 2h query heads
    assert kv[a + "attention.key_length"] == kv[a + "attention.value_length"] == 64
    assert kv[a + "rope.scaling.finetuned"] is True                   # RoPE on in granitehybrid
    assert kv[a + "rope.scaling.type"] == "yarn" and kv[a + "rope.scaling.factor"] == 4.0
    assert kv[a + "rope.scaling.original_context_length"] == 64
    assert a + "rope.scaling.attn_factor" not in kv                   # llama.cpp's default = YaRN's temperature
    assert kv[a + "expert_count"] == 4 and kv[a + "expert_used_count"] == 4   # soft router: all experts
    assert kv[a + "expert_shared_feed_forward_length"] == 256
    assert kv[a + "ssm.group_count"] == 2 and kv[a + "ssm.time_step_rank"] == 8
    assert kv[a + "ssm.inner_size"] == 512 and kv[a + "ssm.state_size"] == 128
    assert kv["tokenizer.ggml.pre"] == "llama-bpe" and kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.ggml.eos_token_id"] == 1 and kv["tokenizer.ggml.eot_token_id"] == 3
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    assert len(kv["tokenizer.ggml.tokens"]) == c.vocab_size

    # transforms, checked against the model's own tensors (ggml shapes are reversed)
    m0 = model.backbone.layers[0].mixer
    np.testing.assert_allclose(tensors["blk.0.ssm_a"].data.reshape(-1), -torch.exp(m0.A_log).detach().numpy(),
                               rtol=1e-6)
    assert list(tensors["blk.0.ssm_norm.weight"].shape) == [256, 2]   # (d_inner / G, G) in ggml order
    assert list(tensors["blk.0.ssm_conv1d.weight"].shape) == [4, c.ssm_conv_dim]
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [256, 256, 4]
    assert "output.weight" not in tensors                            # tied: llama.cpp reuses token_embd
    np.testing.assert_allclose(tensors["token_embd.weight"].data, model.embed.full_table().detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    assert list(tensors["blk.2.attn_output.weight"].shape) == [4 * 64, 256]
    assert not any("lambda" in name for name in tensors)
    assert report.tensors == len(tensors)
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_rope_permutation_maps_half_split_to_adjacent_pairs():
    """After the row permutation, rotating adjacent pairs (llama.cpp NORM) gives the permuted q of ours."""
    d, heads = 16, 3
    w = torch.randn(heads * d, 8, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    inv_freq, scale = rope_inv_freq(d, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    pos = torch.arange(5)[None]
    cos, sin = rope_cos_sin(pos, inv_freq, scale, torch.float64)
    ours = apply_rope((x @ w.T).view(1, 5, heads, d).transpose(1, 2), cos, sin)          # (1, h, 5, d)
    q = (x @ permute_rope_rows(w, heads).T).view(5, heads, d // 2, 2)                    # adjacent pairs
    angle = pos[0, :, None].double() * inv_freq[None]                                    # (5, d/2)
    c, s = (angle.cos() * scale)[:, None], (angle.sin() * scale)[:, None]
    rotated = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], dim=-1)
    theirs = rotated.reshape(5, heads, d)
    expected = permute_rope_rows(ours[0].transpose(0, 1).reshape(5, heads * d).T, heads).T.reshape(5, heads, d)
    torch.testing.assert_close(theirs, expected)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_types_keep_llama_cpp_f32_tensors(exported, seed, kind):
    kv, tensors = fields(exported("flagship", seed, kind))
    assert kv["general.file_type"] == {"f16": 1, "bf16": 32}[kind]
    want = {"f16": "F16", "bf16": "BF16"}[kind]
    for name in ("token_embd.weight", "blk.0.ssm_in.weight", "blk.0.ffn_up_exps.weight", "blk.2.attn_q.weight"):
        assert tensors[name].tensor_type.name == want, name
    for name in ("blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight", "blk.0.ssm_norm.weight",
                 "blk.0.ffn_gate_inp.weight", "blk.0.attn_norm.weight", "blk.0.ssm_dt.bias"):
        assert tensors[name].tensor_type.name == "F32", name


def test_transformer_shaped_untied_head(exported, seed):
    kv, tensors = fields(exported("transformer", seed))
    # without Mamba2 layers: llama.cpp's granite graph (granitehybrid aborts on an empty recurrent state)
    assert kv["general.architecture"] == "granite"
    assert kv["granite.attention.head_count_kv"] == [4, 4]
    assert kv["granite.rope.scaling.type"] == "none" and kv["granite.logit_scale"] == 1.0
    assert "granite.expert_count" not in kv and "granite.ssm.inner_size" not in kv
    assert "output.weight" in tensors and "blk.0.ffn_gate.weight" in tensors


# ---- bad input --------------------------------------------------------------------------------------


def test_non_exportable_config_lists_every_rule(make_checkpoint, seed, tmp_path):
    ckpt = make_checkpoint("flagship", seed, moe_router="switch", attn_type="diff", attn_num_heads=1,
                           attn_head_dim=64)
    with pytest.raises(ExportError) as err:
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert "moe_router" in str(err.value) and "attn_type" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_quant_type_that_shapes_do_not_allow_names_tensor_and_alternatives(make_checkpoint, seed, tmp_path):
    # 3 heads of 64: attn_output rows of 192 values, not a multiple of 256 (K-quants) but of 32 (q8_0, q4_0).
    ckpt = make_checkpoint("flagship", seed, attn_type="gqa", attn_num_heads=3, attn_num_kv_heads=1)
    with pytest.raises(ExportError) as err:
        export_gguf(ckpt, tmp_path / "x.gguf", "q4_k_m")
    message = str(err.value)
    assert "q4_k_m" in message and "blk.2.attn_output.weight" in message and "192" in message
    assert "q8_0" in message and "q4_0" in message and "q6_k" not in message.split("fit this model:")[1]
    export_gguf(ckpt, tmp_path / "ok.gguf", "f16")                     # other types still export


def test_unknown_type(make_checkpoint, seed, tmp_path):
    with pytest.raises(ExportError, match="q3_k"):
        export_gguf(make_checkpoint("flagship", seed), tmp_path / "x.gguf", "q3_k")


def test_quant_type_without_llama_cpp_says_how_to_install(make_checkpoint, seed, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp now raises ImportError
    with pytest.raises(ExportError, match="llama-cpp-python"):
        export_gguf(make_checkpoint("flagship", seed), tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_missing_tokenizer_names_the_file(make_checkpoint, seed, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("flagship", seed), ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json"):
        export_gguf(ckpt, tmp_path / "x.gguf")


def test_missing_weights_and_missing_directory(tmp_path):
    with pytest.raises(ExportError, match="no such directory"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf")


def test_unwritable_output(make_checkpoint, seed, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="not a directory"):
        export_gguf(make_checkpoint("flagship", seed), blocker / "x.gguf")
    with pytest.raises(ExportError, match="is a directory"):
        export_gguf(make_checkpoint("flagship", seed), tmp_path)


def test_interrupted_export_leaves_no_file(make_checkpoint, seed, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    real = gguf_export.write_gguf_file

    def interrupted(path, *args, **kwargs):
        real(path, *args, **kwargs)
        with open(path, "r+b") as fh:          # a complete-looking file under the temporary name ...
            fh.truncate(1000)
        raise KeyboardInterrupt                # ... and the process is stopped before the rename

    monkeypatch.setattr(gguf_export, "write_gguf_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(make_checkpoint("flagship", seed), out)
    assert not out.exists()
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(make_checkpoint("flagship", seed), out)
    assert out.read_bytes() == b"old"          # an existing file is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_tokenizer_rules(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ExportError, match="vocab_size"):
        gguf_vocab(tokenizer, len(tokenizer) - 1)
    with pytest.raises(ExportError, match="eos_token_id"):
        gguf_vocab(tokenizer, len(tokenizer), eos_token_id=3)
    padded = gguf_vocab(tokenizer, len(tokenizer) + 3)
    assert padded.tokens[-1] == f"[PAD{len(tokenizer) + 2}]" and padded.token_types[-1] == 5
    assert padded.token_types[:4] == [3, 3, 3, 3]                     # the special tokens are control tokens

    odd = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="pre-tokenizer"):
        gguf_vocab(PreTrainedTokenizerFast(tokenizer_object=odd), 3)


def test_cli_export_and_error(make_checkpoint, seed, tmp_path, capsys):
    from mamba_moe.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(make_checkpoint("flagship", seed)), "-o", str(out), "--type", "f16"]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["export", "gguf", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
