"""Feed-forward layers: a dense MLP and a mixture of experts with an optional shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MambaMoEConfig
from ..ops.dtypes import cast
from ..ops.moe import AcrossRanks, Routing, domain_routing_loss, load_balancing_loss, route, router_z_loss
from ..ops.moe_dispatch import mix_packed, pack_experts, soft_moe, sorted_moe

# Below this many tokens an inference call runs the soft mixture expert by expert (see mix_soft).
SOFT_WIDE_MIN_TOKENS = 256


class FeedForward(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)) or GELU (down(gelu(up x))) MLP."""

    def __init__(self, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class ExpertBank(nn.Module):
    """E MLPs stored as stacked weights (E, out, in), the layout of grouped GEMMs and of GGUF's *_exps."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        for param in self.parameters():  # usable on its own; the model's init_weights rescales
            nn.init.normal_(param, 0.0, 0.02)

    def _mlp(self, x: Tensor, gate: Tensor | None, up: Tensor, down: Tensor) -> Tensor:
        h = F.linear(x, up)
        h = F.silu(F.linear(x, gate)) * h if gate is not None else F.gelu(h)
        return F.linear(h, down)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e applied to tokens x (n, d_model)."""
        gate = self.gate_proj[e] if self.activation == "swiglu" else None
        return self._mlp(x, gate, self.up_proj[e], self.down_proj[e])

    def mix_sparse(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[:, e] * expert_e(x), running each expert only on the tokens with weight != 0.

        The stacked weights are unbound once: indexing them per expert would make autograd build a
        full-size zero gradient for every expert, E times the memory traffic of one.
        """
        gates = self.gate_proj.unbind(0) if self.activation == "swiglu" else [None] * self.up_proj.shape[0]
        ups, downs = self.up_proj.unbind(0), self.down_proj.unbind(0)
        out = torch.zeros_like(x)
        for e in range(len(ups)):
            idx = weights[:, e].nonzero().squeeze(-1)
            if idx.numel():
                y = self._mlp(x[idx], gates[e], ups[e], downs[e]) * weights[idx, e, None].to(x.dtype)
                out = out.index_add(0, idx, y)
        return out

    def mix_grouped(self, x: Tensor, weights: Tensor, top_k: int, impl: str | None = None) -> Tensor:
        """What :meth:`mix_sparse` computes, for at most ``top_k`` nonzero weights per row, without a loop
        over experts: tokens sorted by expert and grouped GEMMs (``ops.moe_dispatch.sorted_moe``)."""
        gate = self.gate_proj if self.activation == "swiglu" else None
        return sorted_moe(x, weights, top_k, gate, self.up_proj, self.down_proj, impl)

    def mix_soft(self, x: Tensor, weights: Tensor, shared: FeedForward | None = None) -> Tensor:
        """sum_e weights[:, e] * expert_e(x) (+ ``shared``(x)) for dense weights (N, E), as one wide MLP:
        ``ops.moe_dispatch.soft_moe``. Equals ``einsum(all_experts(x), weights) + shared(x)``.

        Without autograd and for a few tokens (decode) the per-expert form is used instead: the wide
        matrices are a copy of every expert's weights, which a handful of tokens cannot amortise
        (300M decode on CPU fell from 6.7 to 0.4 tok/s with it)."""
        if not torch.is_grad_enabled() and x.shape[0] < SOFT_WIDE_MIN_TOKENS:
            out = torch.einsum("ned,ne->nd", self.all_experts(x), weights.to(x.dtype))
            return out if shared is None else out + shared(x)
        swiglu = self.activation == "swiglu"
        return soft_moe(x, weights, self.gate_proj if swiglu else None, self.up_proj, self.down_proj,
                        shared.gate_proj.weight if shared is not None and swiglu else None,
                        None if shared is None else shared.up_proj.weight,
                        None if shared is None else shared.down_proj.weight)

    def all_experts(self, x: Tensor) -> Tensor:
        """Every expert on every token: (n, d_model) -> (n, E, d_model), as batched matmuls."""
        up = torch.einsum("nd,efd->nef", x, self.up_proj)
        if self.activation == "swiglu":
            h = F.silu(torch.einsum("nd,efd->nef", x, self.gate_proj)) * up
        else:
            h = F.gelu(up)
        return torch.einsum("nef,edf->ned", h, self.down_proj)


class PackedExperts(nn.Module):
    """An MoE layer's routed experts and shared expert packed into the two matrices of the wide MLP (inference).

    A weight transform of an :class:`ExpertBank` (+ shared :class:`FeedForward`): ``first`` holds every
    expert's [gate | up] rows, ``down`` every down projection side by side, and ``mix`` is
    ``ops.moe_dispatch.mix_packed``, the product the soft router's training path computes, here with the
    matrices built once. Any routing weights go through it, top-k and Switch included (zeros for the
    unchosen experts): a decode step then has no data-dependent shapes and no host sync (CUDA graphs
    capture it). The two matrices are ``nn.Linear`` layers, so an int8 transform (``dynamic_int8``) applies
    to them like to any other linear layer. Built from the weights as they are: rebuild after changing them.
    """

    def __init__(self, bank: ExpertBank, shared: FeedForward | None) -> None:
        super().__init__()
        self.activation = bank.activation
        self.num_experts, self.hidden, d_model = bank.up_proj.shape
        swiglu = self.activation == "swiglu"
        with torch.no_grad():
            first, down = pack_experts(
                bank.gate_proj if swiglu else None, bank.up_proj, bank.down_proj,
                shared.gate_proj.weight if shared is not None and swiglu else None,
                None if shared is None else shared.up_proj.weight, None if shared is None else shared.down_proj.weight)
        self.first = nn.Linear(d_model, first.shape[0], bias=False, device=first.device, dtype=first.dtype)
        self.down = nn.Linear(down.shape[1], d_model, bias=False, device=down.device, dtype=down.dtype)
        self.first.weight.data, self.down.weight.data = first.contiguous(), down.contiguous()
        self.requires_grad_(False)

    def mix(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[:, e] * expert_e(x) + shared(x) for tokens x (n, d_model) and weights (n, E)."""
        return mix_packed(x, weights, self.first, self.down, self.hidden, self.activation == "swiglu")


@dataclass
class RouterStats:
    """Per-layer routing facts: tokens per expert (after capacity) and tokens dropped, for logging; and the
    domain-guided routing loss (with gradient) when expert targets were given, for the trainer to weight."""

    tokens_per_expert: Tensor
    dropped_tokens: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    domain_loss: Tensor | None = None


class MoEFeedForward(nn.Module):
    """Routed experts (soft, top-k or Switch) plus an optional always-on shared expert (weight 1)."""

    def __init__(self, config: MambaMoEConfig) -> None:
        super().__init__()
        self.router_kind = config.moe_router
        self.num_experts = config.moe_num_experts
        self.top_k = config.effective_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.min_capacity = config.moe_min_capacity
        self.aux_loss_coef = config.moe_aux_loss_coef
        self.z_loss_coef = config.moe_z_loss_coef
        self.router = nn.Linear(config.d_model, config.moe_num_experts, bias=False)
        self.experts = ExpertBank(config.moe_num_experts, config.d_model, config.moe_expert_hidden_size,
                                  config.ffn_activation)
        self.shared_expert = (FeedForward(config.d_model, config.moe_shared_expert_hidden_size, config.ffn_activation)
                              if config.moe_shared_expert_hidden_size else None)
        # Set by a data-parallel trainer (training/parallelize.py): the balance loss then uses every rank's
        # routing statistics while training, so it is one process's on the global batch.
        self.balance_across: AcrossRanks | None = None

    def pack(self) -> None:
        """Inference only: replace the expert bank and the shared expert by one :class:`PackedExperts`.

        Outputs stay the same (same products, packed); the layer can no longer be trained or saved in the
        checkpoint layout, so apply this to a copy (``inference.decoders.fast_decode`` does).
        """
        if not isinstance(self.experts, PackedExperts):
            self.experts = PackedExperts(self.experts, self.shared_expert)
            self.shared_expert = None

    def _route(self, tokens: Tensor, valid: Tensor | None, stats: bool = True) -> tuple[Tensor, Routing]:
        """Router logits (in >= fp32) and the routing of ``tokens`` (n, d)."""
        router_dtype = torch.promote_types(tokens.dtype, torch.float32)  # route in >= fp32
        # autocast (bf16 training) would run this product in bf16 whatever its inputs' dtype
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(cast(tokens, router_dtype), cast(self.router.weight, router_dtype))
        return logits, route(logits, self.router_kind, self.top_k, valid, self.capacity_factor, self.min_capacity,
                             stats)

    def _dispatch(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """The routed experts (+ the shared expert) applied to tokens (n, d) with mixing weights (n, E)."""
        if isinstance(self.experts, PackedExperts):
            return self.experts.mix(tokens, weights)
        # No loop over experts. References: all_experts (soft) and mix_sparse (top-k / Switch).
        if self.router_kind == "soft":
            return self.experts.mix_soft(tokens, weights, self.shared_expert)
        out = (self.experts.mix_grouped(tokens, weights, self.top_k) if tokens.is_cuda
               else self.experts.mix_sparse(tokens, weights))
        return out if self.shared_expert is None else out + self.shared_expert(tokens)

    def step(self, hidden: Tensor) -> Tensor:
        """Inference on (..., d) tokens, none of them padding: the output alone, no losses or statistics.

        Switch capacity counts the tokens of this call, as ``forward`` does for a one-position chunk.
        """
        tokens = hidden.reshape(-1, hidden.shape[-1])
        _, routing = self._route(tokens, None, stats=False)
        return self._dispatch(tokens, routing.weights).view(hidden.shape)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, expert_targets: Tensor | None = None,
                router_stats: bool = True) -> tuple[Tensor, Tensor | None, RouterStats | None]:
        """hidden (b, l, d) -> (output, weighted aux loss, stats). Padding (mask False) is not routed.

        ``expert_targets`` (b, l), -1 = none: the domain-guided routing loss is the router's cross-entropy
        toward each token's preferred expert (a nudge: the router stays free to choose otherwise).
        ``router_stats=False`` (inference): the auxiliary losses and statistics are not computed (None, None).
        """
        b, l, d = hidden.shape
        # Position-major token order, so Switch capacity is granted to earlier positions first.
        tokens = hidden.transpose(0, 1).reshape(l * b, d)
        valid = None if mask is None else mask.transpose(0, 1).reshape(l * b)
        logits, routing = self._route(tokens, valid, router_stats)
        out = self._dispatch(tokens, routing.weights).view(l, b, d).transpose(0, 1)
        if not router_stats:
            return out, None, None

        # Only in a training forward: evaluation and sampling may run on one rank alone (a collective would hang).
        across = self.balance_across if self.training and torch.is_grad_enabled() else None
        balance = load_balancing_loss(logits, routing.assigned, valid, across)
        z = router_z_loss(logits, valid)
        aux = self.aux_loss_coef * balance + self.z_loss_coef * z
        stats = RouterStats(tokens_per_expert=(routing.weights > 0).sum(0).detach() if self.router_kind != "soft"
                            else routing.assigned.sum(0).detach(),
                            dropped_tokens=routing.dropped.sum().detach(),
                            balance_loss=balance.detach(), z_loss=z.detach(),
                            domain_loss=None if expert_targets is None else domain_routing_loss(
                                logits, expert_targets.transpose(0, 1).reshape(l * b), valid))
        return out, aux, stats
