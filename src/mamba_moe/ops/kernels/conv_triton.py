"""Causal depthwise conv1d with the SiLU fused, through Triton, for training (no carried state).

``causal_conv1d_triton(x, weight, bias, seq_idx, activation)`` computes what
``silu(ops.conv.causal_conv1d(x, weight, bias, seq_idx=seq_idx)[0])`` computes (``activation=False``:
without the SiLU), for x (b, l, c) channels-last, possibly a strided view (the mixer passes its slice
of in_proj's output, read in place). Why: ATen runs this conv channels-first, so the model paid a
transpose + pad copy, the depthwise kernels (measured ~1 ms per layer fwd + bwd at 16k tokens on an
H100, about 20 ms of a flagship step) and copies back; here one pass reads x and writes y, and the
backward one pass reads x and dy and writes dx, recomputing the pre-activation instead of storing it.

Accumulation is fp32; y and dx come back in x's dtype; dweight and dbias in fp32, cast to their dtype.
No initial state and no final state: the decode / prefill path keeps the reference. kernel size <= 4.
The forward and backward are custom ops (opaque nodes for torch.compile), like the SSD's.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .ssd_triton import _fix_interpreter_scalar_index, _interpreting, triton_available

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Whether Mamba2Mixer's training path uses this kernel on CUDA: yes unless MAMBA_MOE_TRITON_CONV=0. GPU-tested
# against the reference in fp32 and bf16, strided, with packed documents, compiled, and inside the mixer.
USE_IN_MODEL = os.environ.get("MAMBA_MOE_TRITON_CONV", "1") != "0"
BLOCK_L, BLOCK_C = 64, 64                      # forward and backward pass 1: one tile of positions x channels
BWD_BLOCK_L, BWD_BLOCK_C, BWD_L_ITERS = 32, 32, 16  # backward pass 2: tiles per program, looped (bench --sweep)


def conv_triton_supports(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`causal_conv1d_triton` takes these inputs here (Triton, CUDA or interpreter, sizes)."""
    return (triton_available() and (x.is_cuda or _interpreting()) and x.dim() == 3 and x.dtype in _DTYPES
            and weight.dim() == 2 and weight.shape[0] == x.shape[2] and 1 <= weight.shape[1] <= 4)


def use_in_model(x: Tensor, weight: Tensor) -> bool:
    """Whether the model should take this kernel for x: :data:`USE_IN_MODEL` and :func:`conv_triton_supports`."""
    return USE_IN_MODEL and conv_triton_supports(x, weight)


def _kernels():
    if _interpreting():
        _fix_interpreter_scalar_index()
    from . import _conv_kernels

    return _conv_kernels


def _grid_l(L: int, per_prog: int) -> int:
    return -(-L // per_prog)


def _fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, activation: bool) -> Tensor:
    b, L, C = x.shape
    K = weight.shape[1]
    y = torch.empty(b, L, C, dtype=x.dtype, device=x.device)
    seq = seq_idx if seq_idx is not None else x.new_zeros(1, dtype=torch.int32)
    grid = (_grid_l(L, BLOCK_L), _grid_l(C, BLOCK_C), b)
    _kernels()._conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq, y, L, C,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        seq.stride(0) if seq_idx is not None else 0, seq.stride(1) if seq_idx is not None else 0,
        K=K, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=activation,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=4)
    return y


def _bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
         activation: bool) -> tuple[Tensor, Tensor, Tensor]:
    b, L, C = x.shape
    K = weight.shape[1]
    k = _kernels()
    seq = seq_idx if seq_idx is not None else x.new_zeros(1, 1, dtype=torch.int32)
    ssb, ssl = (seq.stride(0), seq.stride(1)) if seq_idx is not None else (0, 0)
    dz = torch.empty(b, L, C, dtype=torch.float32, device=x.device)
    k._conv_dz_kernel[(_grid_l(L, BLOCK_L), _grid_l(C, BLOCK_C), b)](
        x, weight, bias if bias is not None else weight, seq, dy, dz, L, C,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), ssb, ssl,
        K=K, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=activation,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=4)
    n_lprog = _grid_l(L, BWD_BLOCK_L * BWD_L_ITERS)
    dx = torch.empty(b, L, C, dtype=x.dtype, device=x.device)
    dw_part = torch.empty(b * n_lprog, C, K, dtype=torch.float32, device=x.device)
    db_part = torch.empty(b * n_lprog, C, dtype=torch.float32, device=x.device)
    k._conv_dx_dw_kernel[(n_lprog, _grid_l(C, BWD_BLOCK_C), b)](
        x, weight, seq, dz, dx, dw_part, db_part, L, C, n_lprog,
        x.stride(0), x.stride(1), x.stride(2), dx.stride(0), dx.stride(1), dx.stride(2), ssb, ssl,
        K=K, HAS_SEQ=seq_idx is not None, BLOCK_L=BWD_BLOCK_L, BLOCK_C=BWD_BLOCK_C, L_ITERS=BWD_L_ITERS,
        num_warps=4)
    return dx, dw_part.sum(0), db_part.sum(0)


@torch.library.custom_op("mamba_moe::causal_conv1d_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, bool activation) -> Tensor")
def _conv_fwd_op(x, weight, bias, seq_idx, activation):
    return _fwd(x, weight, bias, seq_idx, activation)


@_conv_fwd_op.register_fake
def _conv_fwd_fake(x, weight, bias, seq_idx, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("mamba_moe::causal_conv1d_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
                                "bool activation) -> (Tensor, Tensor, Tensor)")
def _conv_bwd_op(dy, x, weight, bias, seq_idx, activation):
    return _bwd(dy, x, weight, bias, seq_idx, activation)


@_conv_bwd_op.register_fake
def _conv_bwd_fake(dy, x, weight, bias, seq_idx, activation):
    C, K = weight.shape
    return (x.new_empty(x.shape), x.new_empty(C, K, dtype=torch.float32), x.new_empty(C, dtype=torch.float32))


class CausalConv1dTritonFn(torch.autograd.Function):
    """Autograd of the Triton conv: one forward kernel, two backward kernels (``_conv_kernels.py``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, activation):
        y = torch.ops.mamba_moe.causal_conv1d_fwd(x, weight, bias, seq_idx, activation)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dw, db = torch.ops.mamba_moe.causal_conv1d_bwd(dy, x, weight, bias, seq_idx, ctx.activation)
        return dx, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype), None, None


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_idx: Tensor | None = None,
                         activation: bool = True) -> Tensor:
    """silu(causal depthwise conv1d of x) (b, l, c), in x's dtype; weight (c, K), bias (c,), seq_idx (b, l).

    Equals ``ops.conv.causal_conv1d`` (no initial state) followed by SiLU (``activation=False``: none).
    Under autocast the weights are used in x's dtype, as the reference's F.conv1d does.
    """
    if not conv_triton_supports(x, weight):
        raise ValueError(f"causal_conv1d_triton: unsupported input x {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"weight {tuple(weight.shape)} (needs Triton on CUDA, kernel size <= 4)")
    if seq_idx is not None:
        if seq_idx.shape != x.shape[:2]:
            raise ValueError(f"seq_idx: expected {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.to(torch.int32)
    weight = weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return CausalConv1dTritonFn.apply(x, weight, bias, seq_idx, bool(activation))
