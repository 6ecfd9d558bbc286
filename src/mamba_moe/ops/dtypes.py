"""Dtype helpers shared by the model's modules."""

from __future__ import annotations

import torch
from torch import Tensor


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would be a no-op.

    A decode step runs a few hundred of these; each ``to`` that changes nothing still costs a dispatcher
    round trip (about a microsecond on a CPU), which a batch-1 step of a small model notices.
    """
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(t: Tensor) -> torch.dtype:
    """At least float32 (bf16 sums of squares, softmaxes and scans are too coarse), float64 if given."""
    return torch.promote_types(t.dtype, torch.float32)
