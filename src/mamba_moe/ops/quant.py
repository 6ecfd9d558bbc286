"""Fake quantization: round weights to llama.cpp's Q4_0 / Q8_0 grid and back, for quantization-aware training.

QAT trains against exactly what the GGUF export will store, so the rounding here follows ggml's reference
quantizers (``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref`` in ``ggml-quants.c``), block by block
along the last dimension (ggml's ``ne0``, the input features of a linear weight):

- Q4_0 (``bits=4``): ``m`` = the block's value of largest magnitude (the first one on ties, sign kept),
  ``d = m / -8``, ``q = min(15, trunc(x * (1/d) + 8.5))`` (so ``q - 8`` in [-8, 7], and ``m`` maps to
  exactly -8), stored scale ``fp16(d)``, value ``(q - 8) * fp16(d)``.
- Q8_0 (``bits=8``): ``d = max|x| / 127``, ``q = round_half_away(x * (1/d))`` in [-127, 127], value
  ``q * fp16(d)``.

A block of zeros has ``d = 0`` and dequantizes to zeros. Arithmetic is float32 (as in ggml) whatever the
input dtype; the result has the input's dtype. :func:`fake_quantize` is the vectorised version with a
straight-through estimator (forward: the quantized values; backward: the gradient passes unchanged);
:func:`fake_quantize_reference` is a plain per-block, per-element loop written after the C code, the
oracle the tests compare against (they also compare with the ``gguf`` package's numpy port of ggml).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUPPORTED_BITS = (4, 8)


def check_quant_args(w: Tensor, bits: int, group_size: int) -> None:
    """ValueError naming the problem (and the weight's shape) unless ``w`` can be quantized so."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: {bits!r} is not supported (choose 4 = Q4_0 or 8 = Q8_0)")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size: must be an even integer >= 2 (got {group_size!r}); GGUF uses 32")
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() < 1:
        raise ValueError(f"weight: expected a floating-point tensor with >= 1 dimension, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if w.shape[-1] % group_size:
        raise ValueError(f"weight of shape {tuple(w.shape)}: last dim {w.shape[-1]} is not a multiple of "
                         f"group_size {group_size}")


def quantize_dequantize(w: Tensor, bits: int = 4, group_size: int = 32) -> Tensor:
    """The values the GGUF file will hold for ``w`` (no gradient: use :func:`fake_quantize` in training)."""
    check_quant_args(w, bits, group_size)
    x = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    if bits == 4:
        pick = x.abs().argmax(dim=-1, keepdim=True)           # first largest magnitude, as ggml's strict '<'
        d = x.gather(-1, pick) / -8.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(x * inv + 8.5), 0.0, 15.0)  # (int8_t)(x*id + 8.5f), MIN(15, ..)
        out = (q - 8.0) * d.half().float()
    else:
        d = x.abs().amax(dim=-1, keepdim=True) / 127.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        v = x * inv
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)           # roundf: halves away from zero
        out = q * d.half().float()
    return out.reshape(w.shape).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, bits: int, group_size: int) -> Tensor:  # type: ignore[override]
        return quantize_dequantize(w, bits, group_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


def fake_quantize(w: Tensor, bits: int = 4, group_size: int = 32) -> Tensor:
    """Quantize ``w`` group-wise along its last dim to Q4_0 (``bits=4``) or Q8_0 (``bits=8``) and dequantize.

    Forward returns exactly :func:`quantize_dequantize`; backward is the identity (straight-through
    estimator), so the latent float weights keep learning while the loss sees the quantized ones.
    """
    check_quant_args(w, bits, group_size)
    return _StraightThrough.apply(w, bits, group_size)


def fake_quantize_reference(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Plain loop over blocks and elements in float32 scalars, transcribing ggml's reference quantizers."""
    check_quant_args(w, bits, group_size)
    flat = w.detach().float().reshape(-1).numpy()
    out = np.zeros_like(flat)
    f32 = np.float32
    for start in range(0, flat.size, group_size):
        block = flat[start:start + group_size]
        amax, vmax = f32(0.0), f32(0.0)
        for v in block:
            if amax < abs(v):
                amax, vmax = f32(abs(v)), f32(v)
        if bits == 4:
            d = f32(vmax / f32(-8.0))
            inv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
            d16 = f32(np.float16(d))
            for j, v in enumerate(block):
                q = min(15, int(f32(f32(v * inv) + f32(8.5))))  # int() truncates toward zero like (int8_t)
                q = max(q, 0)
                out[start + j] = f32(q - 8) * d16
        else:
            d = f32(amax / f32(127.0))
            inv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
            d16 = f32(np.float16(d))
            for j, v in enumerate(block):
                x = f32(v * inv)
                q = float(np.floor(abs(x) + f32(0.5))) * (1.0 if x >= 0 else -1.0)
                out[start + j] = f32(q) * d16
    return torch.from_numpy(out).reshape(w.shape).to(w.dtype)
