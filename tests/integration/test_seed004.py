"""Seed 004's API: create_mamba_moe builds a working Mamba / Switch-MoE backbone; the example runs."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import create_mamba_moe

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed004_usage.py"


def small(**extra):
    return create_mamba_moe(dim=64, depth=2, d_state=16, d_conv=2, expand=1, num_experts=4, expert_dim=128,
                            max_seq_len=256, device="cpu", **extra)


def test_the_published_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("loguru")
    monkeypatch.chdir(tmp_path)  # the example writes mamba_moe.log into the working directory
    output = runpy.run_path(str(EXAMPLE))["main"]()
    assert output.shape == (4, 512, 256) and torch.isfinite(output).all()


def test_import_alias():
    from mamba_r1.model import create_mamba_moe as alias
    assert alias is create_mamba_moe


def test_layers_alternate_mamba_and_switch_moe():
    model = small()
    assert [(b.mixer_kind, b.ffn_kind) for b in model.layers] == [("mamba", "moe")] * 2
    assert model.config.moe_router == "switch" and model.config.ssm_conv_kernel == 2


def test_mask_is_honoured():
    model = small(moe_min_capacity=64).eval()
    x = torch.randn(3, 20, 64)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, :5] = False   # left padding
    mask[1, 14:] = False  # right padding
    with torch.no_grad():
        out = model(x, mask=mask)
        noisy = x.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), 64) * 100
        out2 = model(noisy, mask=mask)
        alone = model(x[0:1, 5:])
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()                       # masked positions are zero
    assert rel_error(out2[mask], out[mask]) < 1e-5       # and influence nothing else
    assert rel_error(out[0, 5:], alone[0]) < 1e-4         # left padding == no padding


def test_capacity_is_applied_and_router_learns():
    model = small(moe_capacity_factor=0.5, moe_min_capacity=1)
    x = torch.randn(2, 64, 64)
    out = model.run(x)
    dropped = sum(int(s.dropped_tokens) for s in out.router_stats)
    assert dropped > 0  # half capacity cannot take every token
    (out.hidden.pow(2).mean() + out.aux_loss).backward()
    for block in model.layers:
        assert block.ffn.router.weight.grad.abs().sum() > 0


def test_wrong_input_shape_is_explained():
    with pytest.raises(ValueError, match=r"expected \(batch, seq, 64\)"):
        small()(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="mask"):
        small()(torch.randn(2, 5, 64), mask=torch.ones(2, 4, dtype=torch.bool))
