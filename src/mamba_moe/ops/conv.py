"""Causal depthwise 1-D convolution (Mamba2's short convolution) as pure functions.

Channels-last tensors: x (b, l, channels), weight (channels, kernel), state (b, channels, kernel - 1),
where the state holds the last kernel - 1 inputs seen, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import cast


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t - K + 1 + k}, with the state standing in for x_{<0}.

    Returns (y (b, l, c), final state (b, c, K - 1)). No activation: the caller applies SiLU.
    ``seq_idx`` (b, l): packed documents; a token sees only earlier inputs of its own document (the
    row's first document also sees ``initial_state``), as if each document were convolved alone.
    """
    if seq_idx is not None:
        return _causal_conv1d_documents(x, weight, bias, initial_state, seq_idx)
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


def _causal_conv1d_documents(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
                             seq_idx: Tensor) -> tuple[Tensor, Tensor]:
    """``causal_conv1d`` with taps that cross a document boundary zeroed: K shifted copies, masked."""
    b, l, c = x.shape
    K = weight.shape[1]
    if seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx: expected ({b}, {l}), got {tuple(seq_idx.shape)}")
    head = (x.new_zeros(b, K - 1, c) if initial_state is None
            else initial_state.to(x.dtype).transpose(1, 2))
    stream = torch.cat([head, x], dim=1)                                               # (b, K-1+l, c)
    docs = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)                # state: first document
    w = weight.to(x.dtype)
    y = x.new_zeros(b, l, c) if bias is None else bias.to(x.dtype).expand(b, l, c).clone()
    for k in range(K):  # tap k reads x_{t - (K - 1) + k}
        same = (docs[:, k:k + l] == seq_idx)[..., None].to(x.dtype)
        y = y + stream[:, k:k + l] * w[:, k] * same
    # The final state continues the row's last document: inputs of earlier documents are zeroed.
    tail = stream[:, stream.shape[1] - (K - 1):]
    tail = tail * (docs[:, docs.shape[1] - (K - 1):] == seq_idx[:, -1:])[..., None].to(x.dtype)
    return y, tail.transpose(1, 2)


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor,
                       bias: Tensor | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """One token: x (b, c), state (b, c, K - 1) -> (y (b, c), new state).

    ``inplace``: write the new state into ``state`` (and return it), so its storage never changes
    (decode without fresh state tensors; CUDA graphs need static buffers). Same values either way.
    """
    window = torch.cat([cast(state, x.dtype), x[..., None]], dim=-1)                  # (b, c, K)
    y = (window * cast(weight, x.dtype)).sum(-1)
    if bias is not None:
        y = y + cast(bias, x.dtype)
    if inplace:
        return y, state.copy_(window[..., 1:])
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
