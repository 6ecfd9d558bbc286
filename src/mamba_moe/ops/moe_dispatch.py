"""Mixture-of-experts execution without a Python loop over experts: the routed weights, applied.

``ops.moe.route`` decides which experts a token uses and with what weight; the functions here only
execute that decision, as a few large matrix products. Each equals a plain reference in
``model.ffn.ExpertBank`` (``all_experts`` for the soft mixture, ``mix_sparse`` for top-k / Switch),
which the tests compare against in float64 on the CPU and in fp32 / bf16 on CUDA.

- ``soft_moe``: with the soft router every expert is active, so the E routed experts and the shared
  expert are one wide MLP whose hidden units are grouped by expert. Up and gate are concatenated
  into one (2 (E h + h_s), d) matrix, each expert's slice of the hidden activation is scaled by its
  routing weight (1 for the shared expert), and one down GEMM over (d, E h + h_s) mixes them:
  sum_e w_e down_e(a_e) = down_all (w ∘ a). Two GEMMs instead of einsums over (n, E, d). The wide
  matrices are built from the stored per-expert parameters on every call (a copy of the FFN's weights,
  small next to the activations of a training batch), so the state dict keeps its layout. Inference
  packs them once instead (``pack_experts``; ``model.ffn.PackedExperts``) and calls ``mix_packed``, the
  same product; top-k and Switch routing weights go through it too (zero for the unchosen experts),
  which makes a decode step free of data-dependent shapes.
- ``sorted_moe``: top-k / Switch. Token-expert pairs are sorted by expert (a stable sort, so the
  order inside an expert is the token order), the tokens gathered into one (N k, d) matrix, and each
  expert's rows multiplied by its weights with a grouped GEMM (``torch._grouped_mm``), or with a loop
  over contiguous slices where that op is unavailable for the device and dtype. Outputs go back to
  token order through the inverse permutation and a sum over the k choices (no atomics: deterministic).
  Every token computes all of its k choices, also those the router zeroed (padding, or a Switch token
  dropped for capacity): their weight 0 removes them from the output, so the result equals the
  reference exactly; the compute of dropped tokens is not saved, but nothing synchronises with the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def pack_experts(gate: Tensor | None, up: Tensor, down: Tensor, shared_gate: Tensor | None = None,
                 shared_up: Tensor | None = None, shared_down: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two matrices of the wide MLP: ``first`` ([gate_all; up_all], or up_all without a gate) and ``down_all``.

    gate / up (E, h, d); down (E, d, h); shared_gate / shared_up (h_s, d) and shared_down (d, h_s) in nn.Linear
    layout, or None for no shared expert. ``first`` is (2 (E h + h_s), d) (SwiGLU) or (E h + h_s, d);
    ``down_all`` is (d, E h + h_s). Hidden units are grouped by expert, the shared expert's last.
    """
    E, h, d = up.shape
    up_all = up.reshape(E * h, d)
    down_all = down.permute(1, 0, 2).reshape(down.shape[1], E * h)
    if shared_up is not None:
        up_all = torch.cat([up_all, shared_up])
        down_all = torch.cat([down_all, shared_down], dim=1)
    if gate is None:
        return up_all, down_all
    gate_all = gate.reshape(E * h, d)
    if shared_up is not None:
        gate_all = torch.cat([gate_all, shared_gate])
    return torch.cat([gate_all, up_all]), down_all


def mix_packed(x: Tensor, weights: Tensor, first: Tensor | Callable[[Tensor], Tensor],
               down: Tensor | Callable[[Tensor], Tensor], hidden: int, swiglu: bool) -> Tensor:
    """sum_e weights[:, e] * expert_e(x) (+ shared(x)) through the matrices of :func:`pack_experts`.

    x (n, d); weights (n, E); ``first`` / ``down`` are the packed matrices or layers that apply them
    (``x -> x W^T``: an int8 linear, for instance); ``hidden``: each routed expert's hidden size. Hidden
    units past E * hidden belong to the shared expert (weight 1).
    """
    n = x.shape[0]
    E = weights.shape[1]
    h = first(x) if callable(first) else F.linear(x, first)
    if swiglu:
        gate_out, up_out = h.chunk(2, dim=-1)
        act = F.silu(gate_out) * up_out
    else:
        act = F.gelu(h)
    routed_width = E * hidden
    if act.shape[1] < routed_width:
        raise ValueError(f"weights: {E} experts of {hidden} hidden units need {routed_width} packed hidden units, "
                         f"the matrices have {act.shape[1]}")
    if torch.is_grad_enabled():
        # Each expert's slice of the hidden layer times its routing weight; the shared expert's slice as is.
        # (A per-column gather of the weights instead would make the backward an index_put with atomics onto
        # E + 1 columns per row: measured 83 ms per layer at 16k tokens on an H100.)
        routed = (act[:, :routed_width].view(n, E, hidden) * weights.to(act.dtype)[:, :, None]).view(n, routed_width)
        if act.shape[1] > routed_width:
            routed = torch.cat([routed, act[:, routed_width:]], dim=1)
    else:  # inference: scale the routed slice in place, no copy of the hidden layer (decode's hot path)
        act[:, :routed_width].view(n, E, hidden).mul_(weights.to(act.dtype)[:, :, None])
        routed = act
    return down(routed) if callable(down) else F.linear(routed, down)


def soft_moe(x: Tensor, weights: Tensor, gate: Tensor | None, up: Tensor, down: Tensor,
             shared_gate: Tensor | None = None, shared_up: Tensor | None = None,
             shared_down: Tensor | None = None) -> Tensor:
    """sum_e weights[:, e] * expert_e(x) (+ shared(x)) as one wide MLP; SwiGLU when ``gate`` is given, else GELU.

    x (n, d); weights (n, E); gate / up (E, h, d); down (E, d, h); shared_gate / shared_up (h_s, d) and
    shared_down (d, h_s) in nn.Linear layout, or None for no shared expert.
    """
    n = x.shape[0]
    E, h, _ = up.shape
    if weights.shape != (n, E):
        raise ValueError(f"weights: expected ({n}, {E}), got {tuple(weights.shape)}")
    first, down_all = pack_experts(gate, up, down, shared_gate, shared_up, shared_down)
    return mix_packed(x, weights, first, down_all, h, gate is not None)


# ---- top-k / Switch: sort by expert, grouped GEMM ----------------------------------------------------

def dispatch_plan(weights: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sorted order of the (token, choice) pairs of ``weights`` (N, E) with at most ``top_k`` nonzeros a row.

    Returns (token index of each sorted pair (N k,), its weight (N k,), inverse permutation (N k,),
    pairs per expert (E,)). Rows with fewer than k nonzero weights fill up with weight-0 pairs.
    """
    N, E = weights.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: must lie in [1, {E}] for {E} experts (got {top_k})")
    top_w, top_e = weights.topk(top_k, dim=-1)                                  # (N, k)
    flat_e = top_e.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(E, dtype=torch.long, device=weights.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
    return order // top_k, top_w.reshape(-1)[order], inverse, counts


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`grouped_linear` can use ``torch._grouped_mm`` for x (M, K) and weight (G, N, K).

    A static rule, so that torch.compile sees no probe: the op exists, the tensors are bf16 on CUDA (its
    documented case, SM >= 80), and row strides are multiples of 16 bytes, as its kernels require.
    Elsewhere (CPU, fp32, fp16) the loop over contiguous slices runs instead.
    """
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == x.dtype
            and x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor, offsets: Tensor, impl: str) -> Tensor:
    """Rows of x (M, K), grouped by expert (``counts`` (G,) rows each, in order), times weight[g]ᵀ (G, N, K).

    ``impl``: "grouped_mm" (one ``torch._grouped_mm``; ``offsets`` = int32 cumulative counts) or "loop"
    (one F.linear per expert over its contiguous slice; needs the counts on the host, one sync).
    """
    if impl == "grouped_mm":
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    if impl != "loop":
        raise ValueError(f"impl: expected 'grouped_mm' or 'loop', got {impl!r}")
    pieces = [F.linear(chunk, w) for chunk, w in zip(x.split(counts.tolist()), weight.unbind(0), strict=True)]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


def sorted_moe(x: Tensor, weights: Tensor, top_k: int, gate: Tensor | None, up: Tensor, down: Tensor,
               impl: str | None = None) -> Tensor:
    """sum_e weights[:, e] * expert_e(x) for ``weights`` (N, E) with at most ``top_k`` nonzeros per row.

    x (N, d); gate / up (E, h, d); down (E, d, h); SwiGLU when ``gate`` is given, else GELU.
    ``impl`` None picks "grouped_mm" where :func:`grouped_mm_supported` says so, else "loop".
    """
    N, d = x.shape
    token, w_sorted, inverse, counts = dispatch_plan(weights, top_k)
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, up, down = x.to(dtype), up.to(dtype), down.to(dtype)
        gate = None if gate is None else gate.to(dtype)
    if impl is None:
        impl = "grouped_mm" if grouped_mm_supported(x, up) and grouped_mm_supported(x, down) else "loop"
    offsets = counts.cumsum(0).to(torch.int32)
    xs = x[token]                                                                # (N k, d), grouped by expert
    h = grouped_linear(xs, up, counts, offsets, impl)
    if gate is not None:
        h = F.silu(grouped_linear(xs, gate, counts, offsets, impl)) * h
    else:
        h = F.gelu(h)
    y = grouped_linear(h, down, counts, offsets, impl) * w_sorted[:, None].to(h.dtype)
    return y[inverse].view(N, top_k, d).sum(1, dtype=out_dtype)
