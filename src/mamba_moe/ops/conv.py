"""Causal depthwise 1-D convolution (Mamba2's short convolution) as pure functions.

Channels-last tensors: x (b, l, channels), weight (channels, kernel), state (b, channels, kernel - 1),
where the state holds the last kernel - 1 inputs seen, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t - K + 1 + k}, with the state standing in for x_{<0}.

    Returns (y (b, l, c), final state (b, c, K - 1)). No activation: the caller applies SiLU.
    """
    b, l, c = x.shape
    K = weight.shape[1]
    if weight.shape[0] != c:
        raise ValueError(f"weight: expected ({c}, kernel), got {tuple(weight.shape)}")
    xt = x.transpose(1, 2)
    if initial_state is None:
        stream = F.pad(xt, (K - 1, 0))
    else:
        if initial_state.shape != (b, c, K - 1):
            raise ValueError(f"initial_state: expected {(b, c, K - 1)}, got {tuple(initial_state.shape)}")
        stream = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)
    y = F.conv1d(stream, weight[:, None, :].to(xt.dtype), None if bias is None else bias.to(xt.dtype), groups=c)
    return y.transpose(1, 2), stream[..., stream.shape[-1] - (K - 1):]


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor,
                       bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: x (b, c), state (b, c, K - 1) -> (y (b, c), new state)."""
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)                     # (b, c, K)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, window[..., 1:]


def conv_state_at(x: Tensor, initial_state: Tensor | None, last_index: Tensor, kernel: int) -> Tensor:
    """The conv state after the token at ``last_index[b]`` of chunk ``x`` (b, l, c); -1 = no token.

    Used with right-padded batches, where the state must end at each row's last real token rather
    than at the end of the chunk.
    """
    b, l, c = x.shape
    xt = x.transpose(1, 2)
    head = (torch.zeros(b, c, kernel - 1, dtype=xt.dtype, device=x.device) if initial_state is None
            else initial_state.to(xt.dtype))
    stream = torch.cat([head, xt], dim=-1)                                             # (b, c, K-1+l)
    offsets = torch.arange(kernel - 1, device=x.device)
    index = (last_index[:, None] + 1 + offsets[None, :]).clamp(min=0)                 # (b, K-1)
    return torch.gather(stream, 2, index[:, None, :].expand(b, c, kernel - 1))
