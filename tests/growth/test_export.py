"""Grown and LoRA-merged checkpoints export to GGUF (llama.cpp granitehybrid): the file is written and read
back with the grown shape, and, where llama-cpp-python is installed, llama.cpp's logits match ours (f32 NMSE
< 1e-9, the export tests' bound)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.llama import LlamaRunner, nmse

gguf = pytest.importorskip("gguf")

from mamba_moe.config import MambaMoEConfig  # noqa: E402
from mamba_moe.export.gguf_export import export_gguf  # noqa: E402
from mamba_moe.growth import add_experts, add_layers, dense_to_moe  # noqa: E402
from mamba_moe.model.lm import MambaMoEForCausalLM  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "Numbers 0 1 2 12 123 and café, Größe, 東京 🙂.\n", "for i in range(10):\n\tprint(i * i)\n"]
# Exportable and small (the export tests' shape): Mamba2 d_state 128 / head_dim 64, diff2 with per-head
# lambda, soft MoE with a shared expert, hidden sizes multiples of 256.
SHAPE = dict(d_model=256, n_layers=3, layer_mixers=["mamba", "attention", "mamba"], layer_ffns=["moe"] * 3,
             embedding_rank=64, ssm_state_size=128, ssm_expand=2, ssm_head_dim=64, ssm_ngroups=1,
             ssm_chunk_size=16, attn_type="diff2", diff2_lambda="head", attn_num_heads=2, attn_num_kv_heads=1,
             attn_head_dim=64, max_position_embeddings=512, ffn_activation="swiglu", moe_num_experts=2,
             moe_expert_hidden_size=256, moe_shared_expert_hidden_size=256, moe_router="soft", ffn_hidden_size=256,
             pad_token_id=0, eos_token_id=1)
F32_NMSE = 1e-9


@pytest.fixture(scope="module")
def tokenizer():
    from mamba_moe.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXT * 8, vocab_size=400, min_frequency=2)


def _model(tokenizer, **overrides) -> MambaMoEForCausalLM:
    model = MambaMoEForCausalLM(MambaMoEConfig(vocab_size=len(tokenizer), **{**SHAPE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):  # decisive routing, as the export tests use
                p.copy_(torch.randn_like(p) * 2.0 / math.sqrt(p.shape[1]))
            else:
                p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.5 * float(p.std())))
    return model.eval()


def _export(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    out = path.parent / f"{path.name}.gguf"
    export_gguf(path, out)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    return out, kv


def _grown(kind, tokenizer):
    if kind == "add_experts":
        return add_experts(_model(tokenizer), 2)
    if kind == "add_layers":
        return add_layers(_model(tokenizer), 1, 1, mixer="mamba", ffn="moe")
    if kind == "dense_to_moe":
        return dense_to_moe(_model(tokenizer, layer_ffns=["dense"] * 3, moe_shared_expert_hidden_size=0), 2)
    pytest.importorskip("peft")
    from mamba_moe.growth.lora import LoraSettings, apply_lora, merge_lora

    model = apply_lora(_model(tokenizer), LoraSettings(rank=4, targets=["in_proj", "out_proj", "q_proj", "o_proj",
                                                                         "gate_proj", "experts"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
    return merge_lora(model)


@pytest.mark.parametrize("kind", ["add_experts", "add_layers", "dense_to_moe", "lora_merge"])
def test_grown_checkpoint_exports(kind, tokenizer, tmp_path):
    model = _grown(kind, tokenizer)
    out, kv = _export(model, tokenizer, tmp_path / kind)
    a = "granitehybrid."
    assert kv["general.architecture"] == "granitehybrid"
    assert kv[a + "block_count"] == model.config.n_layers
    assert kv[a + "expert_count"] == model.config.moe_num_experts == kv[a + "expert_used_count"]
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python not installed: file checked, llama.cpp parity not run")
    ids = tokenizer.encode("".join(TEXT), add_special_tokens=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    runner = LlamaRunner(llama_cpp, out, n_ctx=256)
    try:
        theirs = runner.prompt_logits(ids)
    finally:
        runner.close()
    error = nmse(theirs, ours)
    print(f"{kind}: llama.cpp vs ours, f32 NMSE {error:.3g} over {len(ids)} positions")
    assert error < F32_NMSE, f"{kind}: NMSE {error:.3g}"


def test_copy_is_independent_of_the_source(tokenizer):
    """Growth returns a new model: the source's weights are untouched (it can still be exported as it was)."""
    model = _model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    add_experts(model, 2)
    add_layers(model, 1, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
