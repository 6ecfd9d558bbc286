"""Rotary position embeddings with YaRN scaling, matching HF transformers and llama.cpp.

YaRN (Peng et al. 2023) keeps high-frequency dimensions as trained (extrapolation), interpolates
low-frequency ones by ``factor``, ramps linearly between the two over the band of dimensions whose
wavelength lies between ``beta_fast`` and ``beta_slow`` rotations of the original context, and
scales cos/sin by the attention temperature 0.1 ln(factor) + 1. Scaling is static: the same
frequencies at training and inference, as llama.cpp computes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature: cos/sin are multiplied by it, so q.k by its square."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The (fractional) dimension index whose wavelength fits ``num_rotations`` times in the context."""
    return (dim * math.log(max_positions / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          max_positions: int) -> tuple[int, int]:
    low = math.floor(yarn_correction_dim(beta_fast, dim, base, max_positions))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, base, max_positions))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in float64 and the cos/sin scale (1.0 without YaRN)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    low, high = yarn_correction_range(float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0)),
                                      head_dim, theta, original)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp                      # 1 where the dimension keeps its trained frequency
    inv_freq = (inv_freq / factor) * (1.0 - extrapolate) + inv_freq * extrapolate
    attention_factor = float(scaling.get("attention_factor") or yarn_attention_factor(factor))
    return inv_freq, attention_factor


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (b, l, head_dim) for integer positions (b, l), half-split layout."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (b, heads, l, d) by the angles in cos/sin (b, l, d); pairs are (i, i + d/2) as in HF.

    llama.cpp's granite graphs rotate adjacent pairs instead; the exporter permutes q/k rows to match.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
