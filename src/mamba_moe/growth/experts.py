"""``--add-experts N``: more routed experts per MoE layer, the model's output unchanged.

The router is a bias-free ``Linear`` followed by a softmax, so a new expert cannot be given a constant
logit offset (there is no bias to hold one): an expert added on its own always takes probability mass from
the others. What *is* exact is giving every expert the same number of copies m with the router's rows
copied: each copy's logit is the original's, the softmax denominator grows by the factor m, so each copy
gets ``p_e / m`` and the m copies together ``p_e`` (the ``-log m`` logit shift, applied to every expert,
which softmax cannot see). Hence N must be a multiple of ``moe_num_experts``, and ``m = 1 + N / E``.

Per router:

- ``soft``: exact for every token. ``split`` (default) gives the copies' down projections random offsets
  that sum to zero over the copies, so the sum is unchanged but the copies differ from the first step
  (exact copies would receive identical gradients under soft routing and stay twins forever).
- ``topk`` with k: the top ``m·k`` entries are the m copies of the original top k, renormalised to the same
  weights, so ``moe_top_k`` becomes ``m·k`` (exact; m times the expert compute). Keeping k is not
  function-preserving: follow with ``--router topk:K`` to go back to K experts per token, which reports the
  held-out loss change.
- ``switch``: a token goes to one copy, weighted by that copy's raw probability ``p_e / m``; every copy's down
  projection is multiplied by m so the product is unchanged, and ``moe_capacity_factor`` by m so each copy
  has the original per-expert capacity. Copies' logits agree only to rounding, so the copy a token picks is
  arbitrary: outputs are exact for every call in which the original drops no token; when it does drop, the
  grown model drops fewer (the expert's tokens share m queues). ``split`` is refused (one copy alone must
  reproduce the expert).

``noise`` is ``copy`` with Gaussian noise on the new copies' weights: not function-preserving (the logits
check measures by how much), for users who want symmetry broken in every matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.lm import MambaMoEForCausalLM
from .common import GrowthError, check_count, old_state, rebuild

INITS = ("split", "copy", "noise")
DEFAULT_SCALE = {"split": 0.5, "noise": 0.01, "copy": 0.0}


def expert_multiplicity(num_experts: int, n_new: int) -> int:
    """m: how many copies of each expert the grown layer holds (the original included)."""
    check_count("add_experts", n_new)
    if n_new % num_experts:
        lower = n_new - n_new % num_experts
        options = " or ".join(str(v) for v in (lower, lower + num_experts) if v > 0)
        raise GrowthError(
            f"add_experts: {n_new} new experts cannot leave the output unchanged: the router has no bias, so "
            f"the softmax mass is kept only when every one of the moe_num_experts={num_experts} experts is copied "
            f"the same number of times; use a multiple of {num_experts} ({options})")
    return 1 + n_new // num_experts


def _noise_like(w: Tensor, scale: float, gen: torch.Generator | None, fallback: float) -> Tensor:
    """N(0, (scale * std)^2) for stacked matrices (..., out, in), with the std of each matrix (``fallback``
    for an all-zero one, e.g. an expert of a layer added with zeroed outputs)."""
    std = w.detach().double().cpu().flatten(-2).std(-1)[..., None, None]
    std = torch.where(std > 0, std, torch.full_like(std, fallback))
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    return (noise * std * scale).to(w.device, w.dtype)


def add_experts(model: MambaMoEForCausalLM, n_new: int, init: str = "split", scale: float | None = None,
                seed: int | None = None) -> MambaMoEForCausalLM:
    """A new model with ``n_new`` more routed experts in every MoE layer (see the module docstring).

    Experts 0..E-1 keep their indices (domain-routing tables and logged loads keep their meaning); copy c of
    expert e (c = 1..m-1) is expert ``c * E + e``. ``scale``: the split offsets' or the noise's standard
    deviation relative to each expert's weights (defaults: split 0.5, noise 0.01). ``seed`` fixes the offsets.
    """
    cfg = model.config
    if "moe" not in cfg.layer_ffns:
        raise GrowthError("layer_ffns: the model has no MoE layer to add experts to; upcycle its dense FFNs "
                          "first (--dense-to-moe E)")
    if init not in INITS:
        raise GrowthError(f"init: {init!r} is not one of {list(INITS)}")
    E = cfg.moe_num_experts
    m = expert_multiplicity(E, n_new)
    router = cfg.moe_router
    if router == "switch" and init == "split":
        raise GrowthError("init: 'split' needs the copies' outputs to be summed, but the switch router sends a "
                          "token to one copy alone; use --init copy (exact) or noise")
    scale = DEFAULT_SCALE[init] if scale is None else float(scale)
    if not scale >= 0:
        raise GrowthError(f"scale: must be a number >= 0, got {scale!r}")

    changes: dict = {"moe_num_experts": m * E}
    if router == "topk":
        changes["moe_top_k"] = m * cfg.moe_top_k
    elif router == "switch":
        changes["moe_capacity_factor"] = m * cfg.moe_capacity_factor
    new_cfg = cfg.replace(**changes)

    gen = None if seed is None else torch.Generator().manual_seed(seed)
    fallback = cfg.initializer_range
    state = old_state(model)
    for i, kind in enumerate(cfg.layer_ffns):
        if kind != "moe":
            continue
        prefix = f"backbone.layers.{i}.ffn."
        state[prefix + "router.weight"] = state[prefix + "router.weight"].repeat(m, 1)
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"{prefix}experts.{name}"
            if key not in state:  # GELU experts have no gate
                continue
            w = state[key]
            grown = w.repeat(m, 1, 1)                                       # copy c of e at c * E + e
            if name == "down_proj" and router == "switch":
                grown = grown * m
            if init == "split" and name == "down_proj" and scale > 0:
                offsets = _noise_like(grown.view(m, E, *w.shape[1:]), scale, gen, fallback)
                offsets = offsets - offsets.mean(0, keepdim=True)           # sums to zero over the m copies
                if m == 2:                                                  # exactly: -x is x negated
                    offsets[1] = -offsets[0]
                grown = grown + offsets.reshape(grown.shape)
            elif init == "noise" and scale > 0:
                grown[E:] = grown[E:] + _noise_like(grown[E:], scale, gen, fallback)
            state[key] = grown
    return rebuild(new_cfg, model, state, seed)
