"""RMSNorm and Mamba2's gated, group-wise RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.dtypes import cast, compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        x32 = cast(x, dtype)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast(x32 * cast(self.weight, dtype), x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) computed separately over each of ``groups`` equal slices of the channels.

    This is mamba_ssm's ``RMSNormGated(group_size=d_inner / ngroups, norm_before_gate=False)``, which
    trained the public Mamba2 checkpoints and which llama.cpp computes (transformers 5.x too). Older
    transformers releases normalised over all of d_inner; the two agree only when ngroups == 1.
    """

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        x32 = cast(x, dtype) * F.silu(cast(z, dtype))
        shape = x32.shape
        x32 = x32.view(*shape[:-1], self.groups, shape[-1] // self.groups)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast(x32.view(shape) * cast(self.weight, dtype), x.dtype)
