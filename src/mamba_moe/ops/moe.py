"""Mixture-of-experts routing as pure functions: router weights, Switch capacity, auxiliary losses.

Token order matters for Switch capacity: tokens are ranked position-major (all sequences' position 0,
then position 1, ...), so whether a token is dropped depends only on tokens at the same or earlier
positions, and the layer stays causal.

Data parallel: the balance loss is a product of batch means, so per-rank statistics give another value
than one process on the global batch; :class:`AcrossRanks` makes :func:`load_balancing_loss` use the
statistics of every rank's tokens (one all-reduce of 2E + 1 numbers per layer and micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Routing:
    """Which experts each token uses and with what weight.

    weights: (N, E) mixing weights (zero where an expert is not used, or the token is dropped / padding).
    assigned: (N, E) bool, the experts chosen before capacity (for the load-balancing fraction).
    dropped: (N,) bool, tokens whose routed experts were all dropped for capacity.
    """

    weights: Tensor
    assigned: Tensor | None    # None when routed without statistics (inference)
    dropped: Tensor | None


def switch_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens each expert may take: ceil(capacity_factor * tokens / experts), at least min_capacity."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens / num_experts))


def _switch_capacity_tensor(valid: Tensor, num_experts: int, capacity_factor: float, min_capacity: int) -> Tensor:
    """:func:`switch_capacity` of the number of valid tokens, as a tensor: no host sync, so no graph break.

    Same arithmetic in float64 ((factor * n) / E, then ceil), so the same integer as the Python formula.
    """
    n = valid.sum().to(torch.float64)
    return torch.ceil(capacity_factor * n / num_experts).clamp(min=min_capacity).to(torch.long)


def route(logits: Tensor, router: str, top_k: int, valid: Tensor | None = None,
          capacity_factor: float = 1.0, min_capacity: int = 0, stats: bool = True) -> Routing:
    """Turn router logits (N, E) into mixing weights, with tokens ordered as capacity should see them.

    - ``soft``: every expert, weighted by softmax(logits).
    - ``topk``: the k largest softmax probabilities, renormalised to sum to 1 (dropless).
    - ``switch``: the top-1 expert weighted by its raw probability; tokens past an expert's capacity
      are dropped (weight 0, so only the residual carries them).

    ``valid`` (N,) bool, False = padding (routed nowhere; None = every token is real). ``stats=False``
    (inference): only ``weights`` is computed, ``assigned`` and ``dropped`` are None; a decode step runs
    this for every MoE layer, so each operation saved counts.
    """
    N, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    assigned = dropped = None
    if router == "soft":
        weights = probs
        if stats:
            assigned = F.one_hot(probs.argmax(-1), E).bool()
            dropped = torch.zeros(N, dtype=torch.bool, device=logits.device)
    elif router == "topk":
        top_p, top_i = probs.topk(top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        if stats:
            assigned = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
            dropped = torch.zeros(N, dtype=torch.bool, device=logits.device)
    elif router == "switch":
        top_p, top_i = probs.max(dim=-1)
        chosen = F.one_hot(top_i, E).bool()
        if valid is None:  # every token counts: the capacity is known on the host, no device reduction
            capacity: int | Tensor = switch_capacity(N, E, capacity_factor, min_capacity)
        else:
            chosen = chosen & valid[:, None]
            capacity = _switch_capacity_tensor(valid, E, capacity_factor, min_capacity)
        rank = torch.cumsum(chosen.long(), dim=0) - 1                                  # place in the queue
        kept = chosen & (rank < capacity)
        weights = kept.to(top_p.dtype) * top_p[:, None]
        if stats:
            assigned, dropped = chosen, ~kept.any(-1)
    else:
        raise ValueError(f"router: unknown router {router!r}; expected soft, topk or switch")
    if valid is not None:
        weights = weights * valid[:, None]
        if stats:
            assigned, dropped = assigned & valid[:, None], dropped & valid
    return Routing(weights=weights, assigned=assigned, dropped=dropped)


@dataclass(frozen=True)
class AcrossRanks:
    """The data-parallel processes whose tokens together form one batch, for :func:`load_balancing_loss`.

    ``group``: their ``torch.distributed`` process group. ``grad_scale``: what the gradient synchronisation
    divides by (DDP and FSDP average gradients over the group: its size), so that the loss can multiply
    its gradient back and the averaged gradient is the one of one process on the whole batch.
    """

    group: Any
    grad_scale: float

    def __deepcopy__(self, memo: dict) -> AcrossRanks:
        """Itself: a process group is a handle on the running job, which ``copy.deepcopy`` cannot pickle, and a
        copy of the model (``growth.lora.merged_copy``, at every checkpoint of a LoRA run) belongs to it too."""
        return self

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum over the group. A functional collective: torch.compile traces it (no graph break)
        and nothing waits for the device on the host."""
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, "sum", self.group)


def load_balancing_loss(logits: Tensor, assigned: Tensor, valid: Tensor | None = None,
                        across: AcrossRanks | None = None) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e; exactly 1.0 when routing is uniform.

    f_e: share of (token, choice) assignments that went to expert e; P_e: mean router probability.
    Only P carries gradient, as in the Switch Transformer. Logits should be float32 or wider.

    ``across``: f_e and P_e over the tokens of every rank of the group (each rank passes its own), so the
    value is that of one process on all of them, on every rank. The gradient flows through this rank's
    tokens only (P_e = (local sum + the other ranks' sum, detached) / global count) and is multiplied by
    ``across.grad_scale``: averaged over the ranks by DDP/FSDP it is then one process's gradient.
    """
    N, E = logits.shape
    valid = torch.ones(N, dtype=torch.bool, device=logits.device) if valid is None else valid
    if across is not None:
        return _balance_across_ranks(logits, assigned, valid, across)
    count = valid.sum().clamp(min=1)
    probs = torch.softmax(logits, dim=-1) * valid[:, None]
    mean_prob = probs.sum(0) / count
    share = assigned.to(probs.dtype).sum(0) / assigned.sum().clamp(min=1)
    return E * (share * mean_prob).sum()


def _balance_across_ranks(logits: Tensor, assigned: Tensor, valid: Tensor, across: AcrossRanks) -> Tensor:
    """:func:`load_balancing_loss` from the group's summed statistics (see there)."""
    E = logits.shape[1]
    probs = torch.softmax(logits, dim=-1) * valid[:, None]
    prob_sum = probs.sum(0)                                            # this rank's tokens, with gradient
    # One collective for the three statistics; float64 keeps the counts exact past 2**24 tokens.
    local = torch.cat([prob_sum.detach().double(), assigned.sum(0).double(), valid.sum().double()[None]])
    total = across.sum(local)
    share = total[E:2 * E] / total[E:2 * E].sum().clamp(min=1)         # f_e: global, no gradient
    count = total[2 * E].clamp(min=1)
    value = (E * (share * total[:E]).sum() / count).to(probs.dtype)    # the one-process value
    carrier = E * (share.to(probs.dtype) * prob_sum).sum() / count.to(probs.dtype)
    # carrier - carrier.detach() is exactly 0: the value stays the global one, the gradient is carrier's, scaled.
    return value + across.grad_scale * (carrier - carrier.detach())


def router_z_loss(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition, keeps router logits small."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    if valid is None:
        return z.mean()
    return (z * valid).sum() / valid.sum().clamp(min=1)


def domain_routing_loss(logits: Tensor, expert_targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean router cross-entropy toward each token's preferred expert; tokens with target -1 (or padding) skip.

    Written without boolean indexing so it never synchronises with the GPU; zero when no token has a target.
    """
    N, E = logits.shape
    if expert_targets.shape != (N,):
        raise ValueError(f"expert_targets: expected ({N},), got {tuple(expert_targets.shape)}")
    use = expert_targets >= 0
    if valid is not None:
        use = use & valid
    nll = F.cross_entropy(logits, expert_targets.clamp(0, E - 1), reduction="none")
    return (nll * use).sum() / use.sum().clamp(min=1)
