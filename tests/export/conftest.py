"""Fixtures of the export tests: small exportable checkpoints and llama-cpp-python runners.

The checkpoints carry the project's real tokenizer (byte-level BPE with the llama-bpe split, ChatML), trained
in a second on a small mixed corpus, and random models whose every parameter is moved away from its
initial value (norm weights, D, lambda, dt_bias, A_log ...), so an export that dropped or mis-laid any
tensor shows in the logits.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.llama import LlamaRunner, llama_cpp_or_skip

from mamba_moe.config import MambaMoEConfig
from mamba_moe.model.lm import MambaMoEForCausalLM

CORPUS = [
    "The quick brown fox jumps over the lazy dog. State space layers carry a fixed-size memory.\n",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for i in range(10):\n\tprint(f\"{i:03d} -> {i * i}\")  # squares\n",
    "Numbers 0 1 2 12 123 1234 12345 3.14159 and 1,000,000; dates 2024-06-01.\n",
    "Non-ASCII: café, naïve, Größe, 東京, Привет мир, مرحبا, emoji 🙂🚀 — done.\n",
    "Contractions: it's, we're, they've, I'm, you'll, he'd. IT'S LOUD. Don't!\n",
    "Whitespace   runs\t\tand\n\n\nnewlines    end.   \n",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}\n",
]

# Flagship-shaped and exportable, small enough for 2 cores: Mamba2 (d_state 128, head_dim 64, ngroups 2),
# diff2 with per-head lambda over one K/V head, soft MoE with a shared expert, YaRN factor 4, a factorized
# tied embedding. Prompts longer than ssm_chunk_size cross chunk boundaries.
BASE = dict(
    d_model=256, n_layers=4, layer_mixers=["mamba", "mamba", "attention", "mamba"], layer_ffns=["moe"] * 4,
    embedding_rank=64, tie_word_embeddings=True,
    ssm_state_size=128, ssm_expand=2, ssm_head_dim=64, ssm_ngroups=2, ssm_conv_kernel=4, ssm_chunk_size=16,
    attn_type="diff2", diff2_lambda="head", attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=64,
    rope_theta=10000.0, max_position_embeddings=512,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32.0, "beta_slow": 1.0},
    ffn_activation="swiglu", moe_num_experts=4, moe_expert_hidden_size=256, moe_shared_expert_hidden_size=256,
    moe_router="soft", pad_token_id=0, eos_token_id=1,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "flagship": {},
    # the README demo's model (configs/train/demo.yaml): d_model 128, d_state 32, head_dim 32, experts of 128 —
    # caveats (CPU backends, no K-quants), not blockers
    "demo": dict(d_model=128, ssm_state_size=32, ssm_head_dim=32, moe_expert_hidden_size=128,
                 moe_shared_expert_hidden_size=128, embedding_rank=64),
    # sparse routing, plain GQA with 2 K/V heads, one group, conv without bias, no shared expert
    "topk": dict(moe_router="topk", moe_top_k=2, attn_type="gqa", attn_num_heads=4, attn_num_kv_heads=2,
                 ssm_ngroups=1, ssm_conv_bias=False, moe_shared_expert_hidden_size=0,
                 layer_mixers=["mamba", "attention", "mamba", "attention"]),
    # transformer-baseline-shaped: all attention, multi-head RoPE, dense SwiGLU, untied head, no scaling
    "transformer": dict(n_layers=2, layer_mixers=["attention"] * 2, layer_ffns=["dense"] * 2, embedding_rank=0,
                        tie_word_embeddings=False, attn_type="gqa", attn_num_heads=4, attn_num_kv_heads=4,
                        rope_scaling=None, ffn_hidden_size=512),
}


@pytest.fixture(scope="session")
def seed() -> int:
    """One random seed per session for the export checkpoints (MAMBA_MOE_TEST_SEED replays it)."""
    value = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"export checkpoint seed: {value} (replay with MAMBA_MOE_TEST_SEED={value})")
    return value


@pytest.fixture(scope="session")
def tokenizer():
    from mamba_moe.data.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 4, vocab_size=480, min_frequency=2)


def perturb(model: MambaMoEForCausalLM, generator: torch.Generator) -> None:
    """Move every parameter away from its init: 1-D ones (norms, D, dt_bias, A_log, biases) by N(0, 0.3^2),
    diff2's lambda (init 0) by N(0, 1), matrices by half their own spread; routers get a decisive scale
    (logits of std ~2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("diff_lambda"):
                p.add_(noise)
            elif p.dim() == 1:
                p.add_(0.3 * noise)
            elif name.endswith("router.weight"):
                p.copy_(noise * 2.0 / math.sqrt(p.shape[1]))
            else:
                p.add_(noise * 0.5 * float(p.std()))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer) -> Callable[..., Path]:
    """make_checkpoint(variant or None, seed, **overrides) -> a checkpoint directory (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(variant: str | None = "flagship", seed: int = 0, **overrides: Any) -> Path:
        key = (variant, seed, repr(sorted(overrides.items())))
        if key in cache:
            return cache[key]
        fields = {"vocab_size": len(tokenizer), **BASE, **VARIANTS[variant or "flagship"], **overrides}
        config = MambaMoEConfig(**fields)
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MambaMoEForCausalLM(config)
        perturb(model, generator)
        path = tmp_path_factory.mktemp(f"ckpt-{variant}-seed{seed}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(str(path))
        cache[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def exported(make_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """exported(variant, seed, kind) -> a GGUF file of make_checkpoint(variant, seed), written once per session."""
    from mamba_moe.export.gguf_export import export_gguf

    cache: dict[tuple, Path] = {}

    def get(variant: str, seed: int, kind: str = "f32") -> Path:
        key = (variant, seed, kind)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"gguf-{variant}-{kind}") / f"{variant}-{kind}.gguf"
            export_gguf(make_checkpoint(variant, seed), out, kind)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_cpp():
    return llama_cpp_or_skip("the llama.cpp parity tests")


@pytest.fixture
def llama_runner(llama_cpp):
    """open(path) -> LlamaRunner; every runner opened in the test is closed after it."""
    opened: list[LlamaRunner] = []

    def open_(path: Path, n_ctx: int = 256) -> LlamaRunner:
        runner = LlamaRunner(llama_cpp, path, n_ctx)
        opened.append(runner)
        return runner

    yield open_
    for runner in opened:
        runner.close()
