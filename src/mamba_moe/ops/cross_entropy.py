"""Language-model loss without the full logits: cross-entropy over token chunks, recomputed in backward.

A batch of 16 x 8192 tokens over a 32k vocabulary has 4.3G logits: 17 GB in fp32, plus as much again for
their gradient. Chunking the rows and checkpointing each chunk keeps one chunk's logits alive at a time
(forward and backward), at the price of computing the head twice. ``lm_cross_entropy_reference`` is the
plain formula and the oracle the tests compare against.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .kernels.ce_triton import ce_triton_supports, cross_entropy_sum_triton

IGNORE_INDEX = -100


def _check(hidden: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},) for hidden {tuple(hidden.shape)}, "
                         f"got {tuple(targets.shape)}")


def lm_cross_entropy_reference(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of ``head(hidden)`` (N, V) against targets (N,), in float32 or wider."""
    _check(hidden, targets)
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index)


def _loss_sum(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index, reduction="sum")


# On CUDA, outside torch.compile, a chunk's loss runs through two Triton kernels (ops/kernels/ce_triton.py):
# one read of the bf16 logits forward, one read and one write backward, instead of about ten eager passes
# over fp32 copies (measured on an H100, 16k tokens x 32k vocabulary: 16.4 ms eager for the chunked loss
# with its head). Same formula, so the same value up to rounding. Inside a compiled graph inductor fuses
# the plain formula itself. False (or MAMBA_MOE_TRITON_CE=0) forces the plain formula.
TRITON_ON_CUDA = os.environ.get("MAMBA_MOE_TRITON_CE", "1") != "0"


def _loss_sum_fast(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    # (ce_triton_supports: CUDA, or the CPU under TRITON_INTERPRET=1 for the kernel tests.)
    if TRITON_ON_CUDA and not torch.compiler.is_compiling() and ce_triton_supports(logits):
        return cross_entropy_sum_triton(logits, targets, ignore_index)
    return _loss_sum(logits, targets, ignore_index)


def _chunk_loss_sum(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], ignore_index: int) -> Tensor:
    return _loss_sum_fast(head(hidden), targets, ignore_index)


def lm_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_size: int = 8192,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` computed ``chunk_size`` rows at a time.

    hidden (N, d), targets (N,) with ``ignore_index`` for positions without a target. Equals
    :func:`lm_cross_entropy_reference` (up to summation order); peak logits memory is one chunk's.
    """
    _check(hidden, targets)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 (got {chunk_size})")
    count = (targets != ignore_index).sum()
    if hidden.shape[0] <= chunk_size:
        total = _chunk_loss_sum(hidden, targets, head, ignore_index)
    else:
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(_chunk_loss_sum, h, t, head, ignore_index, use_reentrant=False)
            else:
                total = total + _chunk_loss_sum(h, t, head, ignore_index)
    # Like F.cross_entropy's mean: NaN when no position has a target.
    return total / count.to(total.dtype)
