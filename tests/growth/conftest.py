"""Fixtures of the growth tests: small float64 models moved away from their initial weights.

A zero-initialised or unit-initialised weight (norms, D, diff2's lambda, ...) could hide a growth operation
that drops or misplaces it, so every parameter of the source model is perturbed first.
"""

from __future__ import annotations

import pytest
import torch

from mamba_moe.config import get_preset
from mamba_moe.model.lm import MambaMoEForCausalLM


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter by ``scale`` times its spread (or by ``scale`` for constant ones) in place."""
    with torch.no_grad():
        for p in model.parameters():
            spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
            p.add_(torch.randn_like(p) * scale * spread)
    return model


@pytest.fixture
def make_model():
    """make_model(preset="mamba-moe-tiny", dtype=torch.float64, **overrides): a perturbed model in eval mode."""

    def make(preset: str = "mamba-moe-tiny", dtype: torch.dtype = torch.float64, **overrides) -> MambaMoEForCausalLM:
        model = MambaMoEForCausalLM(get_preset(preset, **overrides)).to(dtype)
        return perturb_(model).eval()

    return make


@pytest.fixture
def ids():
    """Fresh random token ids (2 rows of 24 tokens, past the tiny preset's 16-token SSM chunk)."""
    return torch.randint(0, 512, (2, 24))


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread per test: these models are tiny, and on a shared 2-core machine two OpenMP threads mostly
    wait on each other (the global ``keep_threads`` fixture restores the count afterwards)."""
    torch.set_num_threads(1)
