"""Attention: the differential forms against direct formulas, diff2 == folded GQA, YaRN values."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.config import get_preset
from mamba_moe.model.attention import Attention
from mamba_moe.ops.diff_attention import diff_lambda_init, fold_diff2_output_projection
from mamba_moe.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, yarn_attention_factor


def make(kind, **overrides):
    config = get_preset("mamba-moe-tiny", attn_type=kind, **overrides)
    layer = Attention(config, layer_index=3).double()
    inv_freq, factor = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    return config, layer, inv_freq, factor


def rope_inputs(b, l, inv_freq, factor):
    pos = torch.arange(l).expand(b, l)
    return rope_cos_sin(pos, inv_freq, factor, torch.float64)


def causal_softmax(q, k):
    """softmax(q k^T / sqrt(d)) with a causal mask, written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    l = q.shape[-2]
    scores = scores.masked_fill(torch.triu(torch.ones(l, l, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(scores, -1)


def test_diff_equals_2024_formula():
    config, layer, inv_freq, factor = make("diff", attn_num_heads=4, attn_num_kv_heads=2)
    b, l, d = 2, 11, config.head_dim
    x = torch.randn(b, l, config.d_model, dtype=torch.float64)
    with torch.no_grad():
        for p in (layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2):
            p.normal_(0, 0.3)
        layer.subln.weight.normal_(1, 0.2)
    cos, sin = rope_inputs(b, l, inv_freq, factor)
    out = layer(x, cos, sin, None)

    lam_init = 0.8 - 0.6 * math.exp(-0.3 * 3)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + lam_init)
    q = apply_rope(layer.q_proj(x).view(b, l, -1, d).transpose(1, 2), cos, sin)   # (b, 2h, l, d)
    k = apply_rope(layer.k_proj(x).view(b, l, -1, d).transpose(1, 2), cos, sin)   # (b, 2kv, l, d)
    v = layer.v_proj(x).view(b, l, config.attn_num_kv_heads, 2 * d).transpose(1, 2)
    group = config.attn_num_heads // config.attn_num_kv_heads
    heads = []
    for i in range(config.attn_num_heads):
        j = i // group  # the K/V head of this head's group: it carries (K1, K2, V)
        a1 = causal_softmax(q[:, 2 * i], k[:, 2 * j])
        a2 = causal_softmax(q[:, 2 * i + 1], k[:, 2 * j + 1])
        o = (a1 - lam * a2) @ v[:, j]
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * layer.subln.weight
        heads.append(o * (1 - lam_init))
    expected = layer.o_proj(torch.stack(heads, 2).reshape(b, l, -1))
    assert rel_error(out, expected) < 1e-10


@pytest.mark.parametrize("lambda_mode", ["head", "token"])
def test_diff2_equals_direct_formula(lambda_mode):
    config, layer, inv_freq, factor = make("diff2", diff2_lambda=lambda_mode)
    b, l, d = 2, 9, config.head_dim
    x = torch.randn(b, l, config.d_model, dtype=torch.float64)
    if lambda_mode == "head":
        with torch.no_grad():
            layer.diff_lambda.normal_()
    cos, sin = rope_inputs(b, l, inv_freq, factor)
    out = layer(x, cos, sin, None)
    q = apply_rope(layer.q_proj(x).view(b, l, -1, d).transpose(1, 2), cos, sin)
    k = apply_rope(layer.k_proj(x).view(b, l, -1, d).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(b, l, -1, d).transpose(1, 2)
    per_kv = 2 * config.attn_num_heads // config.attn_num_kv_heads
    lam = torch.sigmoid(layer.diff_lambda if lambda_mode == "head" else layer.lambda_proj(x))
    heads = []
    for i in range(config.attn_num_heads):
        o_a = causal_softmax(q[:, 2 * i], k[:, (2 * i) // per_kv]) @ v[:, (2 * i) // per_kv]
        o_b = causal_softmax(q[:, 2 * i + 1], k[:, (2 * i + 1) // per_kv]) @ v[:, (2 * i + 1) // per_kv]
        s = lam[i] if lambda_mode == "head" else lam[..., i, None]
        heads.append(o_a - s * o_b)
    expected = layer.o_proj(torch.stack(heads, 2).reshape(b, l, -1))
    assert rel_error(out, expected) < 1e-10


def test_diff2_per_head_equals_plain_gqa_with_folded_output_projection():
    config, layer, inv_freq, factor = make("diff2", attn_num_heads=4, attn_num_kv_heads=2)
    with torch.no_grad():
        layer.diff_lambda.normal_()
    plain_config = config.replace(attn_type="gqa", attn_num_heads=2 * config.attn_num_heads)
    plain = Attention(plain_config, 3).double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(plain, name).weight.copy_(getattr(layer, name).weight)
        plain.o_proj.weight.copy_(fold_diff2_output_projection(layer.o_proj.weight, torch.sigmoid(layer.diff_lambda),
                                                               config.head_dim))
    b, l = 3, 13
    x = torch.randn(b, l, config.d_model, dtype=torch.float64)
    cos, sin = rope_inputs(b, l, inv_freq, factor)
    assert rel_error(plain(x, cos, sin, None), layer(x, cos, sin, None)) < 1e-12


def test_lambda_init_follows_depth():
    assert diff_lambda_init(0) == pytest.approx(0.2)
    assert diff_lambda_init(10) == pytest.approx(0.8 - 0.6 * math.exp(-3.0))


def test_yarn_frequencies_and_temperature_equal_formula():
    dim, base, factor, original = 64, 10000.0, 4.0, 8192
    inv_freq, temperature = rope_inv_freq(dim, base, {"type": "yarn", "factor": factor,
                                                      "original_max_position_embeddings": original,
                                                      "beta_fast": 32, "beta_slow": 1})
    assert temperature == pytest.approx(0.1 * math.log(factor) + 1) == yarn_attention_factor(factor)

    def corr_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(32)), 0), min(math.ceil(corr_dim(1)), dim - 1)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected = theta / factor * ramp + theta * (1 - ramp)  # ramp 0: keep (extrapolate); 1: interpolate
        assert inv_freq[i].item() == pytest.approx(expected, rel=1e-12)
    # The fastest dimension keeps its frequency; the slowest is divided by the factor.
    assert inv_freq[0].item() == pytest.approx(1.0)
    assert inv_freq[-1].item() == pytest.approx(base ** (-(dim - 2) / dim) / factor)


def test_rope_preserves_norm_and_relative_positions():
    d = 16
    inv_freq, _ = rope_inv_freq(d, 10000.0)
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)

    def at(t, pos):
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), inv_freq, 1.0, torch.float64)
        return apply_rope(t, cos, sin)

    assert torch.allclose(at(q, 7).norm(), q.norm())
    dot1 = (at(q, 10) * at(k, 3)).sum()
    dot2 = (at(q, 107) * at(k, 100)).sum()
    assert torch.allclose(dot1, dot2)
