"""Numerical comparison helpers for tests."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; NaN anywhere counts as infinitely wrong."""
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    scale = expected.detach().abs().max().clamp(min=1e-30)
    return float((actual - expected).detach().abs().max() / scale)
