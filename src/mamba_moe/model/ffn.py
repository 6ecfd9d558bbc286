"""Feed-forward layers: a dense MLP and a mixture of experts with an optional shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MambaMoEConfig
from ..ops.moe import domain_routing_loss, load_balancing_loss, route, router_z_loss
from ..ops.moe_dispatch import soft_moe, sorted_moe

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

    def forward(self, hidden: Tensor, mask: Tensor | None = None,
                expert_targets: Tensor | None = None) -> tuple[Tensor, Tensor, RouterStats]:
        """hidden (b, l, d) -> (output, weighted aux loss, stats). Padding (mask False) is not routed.

        ``expert_targets`` (b, l), -1 = none: the domain-guided routing loss is the router's cross-entropy
        toward each token's preferred expert (a nudge: the router stays free to choose otherwise).
        """
        b, l, d = hidden.shape
        # Position-major token order, so Switch capacity is granted to earlier positions first.
        tokens = hidden.transpose(0, 1).reshape(l * b, d)
        valid = None if mask is None else mask.transpose(0, 1).reshape(l * b)
        router_dtype = torch.promote_types(tokens.dtype, torch.float32)  # route in >= fp32
        logits = F.linear(tokens.to(router_dtype), self.router.weight.to(router_dtype))
        routing = route(logits, self.router_kind, self.top_k, valid, self.capacity_factor, self.min_capacity)

        # Dispatch: no loop over experts. References: all_experts (soft) and mix_sparse (top-k / Switch).
        if self.router_kind == "soft":
            out = self.experts.mix_soft(tokens, routing.weights, self.shared_expert)
        else:
            out = (self.experts.mix_grouped(tokens, routing.weights, self.top_k) if tokens.is_cuda
                   else self.experts.mix_sparse(tokens, routing.weights))
            if self.shared_expert is not None:
                out = out + self.shared_expert(tokens)
        out = out.view(l, b, d).transpose(0, 1)

        balance = load_balancing_loss(logits, routing.assigned, valid)
        z = router_z_loss(logits, valid)
        aux = self.aux_loss_coef * balance + self.z_loss_coef * z
        stats = RouterStats(tokens_per_expert=(routing.weights > 0).sum(0).detach() if self.router_kind != "soft"
                            else routing.assigned.sum(0).detach(),
                            dropped_tokens=routing.dropped.sum().detach(),
                            balance_loss=balance.detach(), z_loss=z.detach(),
                            domain_loss=None if expert_targets is None else domain_routing_loss(
                                logits, expert_targets.transpose(0, 1).reshape(l * b), valid))
        return out, aux, stats
