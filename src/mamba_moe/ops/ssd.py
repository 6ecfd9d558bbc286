"""Mamba2's state-space duality (SSD) scan as pure functions.

The recurrence, per head h with scalar decay and per-group B/C (group = h // (heads / groups)):

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)      state: (head_dim, d_state)
    y_t     = state_t @ C_t + D * x_t

Three forms of the same function:
- ``ssd_sequential``: the recurrence token by token; slow, obviously right: the reference.
- ``ssd_chunked``:    the chunked (quadratic inside a chunk, linear across chunks) algorithm of
                      Dao & Gu (2024); used for training and prefill on CPU and as the oracle for kernels.
- ``ssd_step``:       one token, for decode.

Shapes: x (b, l, h, p), dt (b, l, h) already positive (softplus applied), A (h,) negative,
B and C (b, l, g, n), D (h,) or None, state (b, h, p, n). Inputs are computed in float32
(float64 stays float64); a position with dt = 0 leaves the state untouched, which is how padding
is made invisible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import cast


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_from_groups(t: Tensor, num_heads: int, dim: int) -> Tensor:
    """Expand a per-group tensor to per-head: head h reads group h // (num_heads // groups)."""
    groups = t.shape[dim]
    return t if groups == num_heads else t.repeat_interleave(num_heads // groups, dim=dim)


def check_ssd_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     initial_state: Tensor | None = None) -> None:
    """Raise a ValueError that names the argument whose shape does not fit."""
    if x.dim() != 4:
        raise ValueError(f"x: expected (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt: expected {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A: expected ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or h % B.shape[2]:
        raise ValueError(f"B: expected ({b}, {l}, groups, d_state) with groups dividing {h}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C: expected the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state: expected {(b, h, p, B.shape[3])}, got {tuple(initial_state.shape)}")


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """One token: state (b, h, p, n), x (b, h, p), dt (b, h), B/C (b, g, n) -> (y (b, h, p), new state).

    Heads are viewed per group, (b, g, h/g, p, n), so B and C are broadcast rather than repeated per
    head, and ``y = state C`` is one matrix-vector product per (row, group): the per-head form
    (h small (p, n) products) is ~9x slower on a CPU.

    ``inplace``: update ``state`` itself (and return it) instead of a new tensor: decode then allocates no
    new state per token and reads/writes it in two passes (same math; the state must be contiguous and
    not needed by autograd). CUDA-graph decode relies on it (static state buffers).
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    dtype = state.dtype
    x32, dt32 = cast(x, dtype), cast(dt, dtype)
    decay = torch.exp(dt32 * cast(A, dtype)).view(b, g, h // g, 1, 1)
    update = (x32 * dt32[..., None]).view(b, g, h // g, p, 1)
    B = cast(B, dtype).reshape(b, g, 1, 1, n)
    if inplace:
        if not state.is_contiguous():
            raise ValueError("state: an in-place step needs a contiguous state tensor")
        state.view(b, g, h // g, p, n).mul_(decay).addcmul_(update, B)
    else:
        state = (state.reshape(b, g, h // g, p, n) * decay + update * B).view(b, h, p, n)
    y = torch.bmm(state.view(b * g, (h // g) * p, n), cast(C, dtype).reshape(b * g, n, 1)).view(b, h, p)
    if D is not None:
        y = torch.addcmul(y, x32, cast(D, dtype)[:, None])
    return y, state


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time. Returns (y (b, l, h, p), final state)."""
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    b, l, h, p = x.shape
    dtype = _compute_dtype(x)
    state = (torch.zeros(b, h, p, B.shape[3], dtype=dtype, device=x.device) if initial_state is None
             else initial_state.to(dtype))
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=dtype)
    return y, state


def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of cumulative sums, which loses
    precision when the sums are large.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)                                             # a[..., i, j] = a_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~lower, float("-inf"))


def check_seq_idx(seq_idx: Tensor, batch: int, seq: int) -> None:
    """``seq_idx`` (batch, seq): integer document index, non-decreasing along each row."""
    if seq_idx.shape != (batch, seq) or seq_idx.is_floating_point():
        raise ValueError(f"seq_idx: expected a ({batch}, {seq}) integer tensor, got {tuple(seq_idx.shape)} "
                         f"{seq_idx.dtype}")
    if seq_idx.device.type == "cpu" and seq > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx: document indices must not decrease along a row (documents are contiguous)")


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                D: Tensor | None = None, initial_state: Tensor | None = None,
                seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD: exact (up to rounding) equal of ``ssd_sequential`` for any chunk size.

    ``seq_idx`` (b, l) packs several documents in a row: the state restarts from zero at each new
    index (the row's first document starts from ``initial_state``), exactly as if each document were
    scanned alone (``ops.kernels.ssd_chunked_varlen_ref`` is that loop). Every term of the chunked form
    is a sum over (source, target) position pairs, so it is masked to pairs in the same document.
    """
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    b, l, h, p = x.shape
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, l)
    n = B.shape[3]
    dtype = _compute_dtype(x)
    x_in = x
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = _heads_from_groups(B, h, 2).to(dtype)
    C = _heads_from_groups(C, h, 2).to(dtype)

    pad = (-l) % chunk_size
    if pad:  # zero dt: padded steps neither decay nor feed the state
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c, T = (l + pad) // chunk_size, chunk_size
    x, B, C = (t.reshape(b, c, T, h, t.shape[-1]) for t in (x, B, C))
    dt = dt.reshape(b, c, T, h)
    if seq_idx is not None:
        doc = F.pad(seq_idx, (0, pad), mode="replicate").reshape(b, c, T)             # padding: last document
        # The document a carried state belongs to: entry 0 is the initial state (first document),
        # entry k the state at the end of chunk k - 1.
        doc_entry = torch.cat([doc[:, :1, 0], doc[..., -1]], dim=1)                   # (b, c + 1)

    a = (dt * A).permute(0, 3, 1, 2)                                                  # (b, h, c, T)
    a_cum = torch.cumsum(a, dim=-1)
    x_dt = x * dt[..., None]                                                          # (b, c, T, h, p)

    # 1. Within each chunk: the masked "attention" form, y_i = sum_j (C_i.B_j) exp(a_j+1..a_i) x_j dt_j.
    decay_in = torch.exp(segsum(a))                                                   # (b, h, c, T, T)
    if seq_idx is not None:
        decay_in = decay_in * (doc[..., :, None] == doc[..., None, :])[:, None]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay_in
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                                 # (b, h, c, T)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (doc == doc[..., -1:])[:, None]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)

    # 3. Carry states across chunks (a recurrence over c + 1 entries, written as a small matmul).
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)       # (b, c+1, h, p, n)
    decay_chunks = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))                   # (b, h, c+1, c+1)
    if seq_idx is not None:
        decay_chunks = decay_chunks * (doc_entry[:, :, None] == doc_entry[:, None, :])[:, None]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. The state entering each chunk, read out at every position inside it.
    decay_out = torch.exp(a_cum)                                                      # (b, h, c, T)
    if seq_idx is not None:
        decay_out = decay_out * (doc == doc_entry[:, :-1, None])[:, None]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_out)

    y = y.reshape(b, c * T, h, p)[:, :l]
    if D is not None:
        y = y + x_in.to(dtype) * D.to(dtype)[:, None]
    return y, final_state
