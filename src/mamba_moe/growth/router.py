"""``--router topk:K``: a new routing rule for the same weights.

Not function-preserving by nature: top-k keeps the k largest softmax probabilities and renormalises them,
so every token loses the experts outside its top k. The one exact case is ``soft`` -> ``topk:E`` (all
experts, renormalised softmax = softmax). Run it with held-out data (``grow --eval``) to see what the
change costs; training a few steps after the switch usually recovers most of it.
"""

from __future__ import annotations

from ..config import ROUTERS
from ..model.lm import MambaMoEForCausalLM
from .common import GrowthError, old_state, rebuild


def parse_router(spec: str) -> tuple[str, int]:
    """"soft" | "switch" | "topk:K" -> (router, top_k); top_k is 1 for soft and switch."""
    if not isinstance(spec, str):
        raise GrowthError(f"router: expected 'soft', 'switch' or 'topk:K', got {spec!r}")
    name, _, k = spec.partition(":")
    if name not in ROUTERS:
        raise GrowthError(f"router: {name!r} is not one of {list(ROUTERS)} (write top-k as topk:K)")
    if name != "topk":
        if k:
            raise GrowthError(f"router: {name!r} takes no ':K' (got {spec!r})")
        return name, 1
    try:
        top_k = int(k)
    except ValueError:
        raise GrowthError(f"router: top-k needs its k, as topk:2 (got {spec!r})") from None
    if top_k < 1:
        raise GrowthError(f"router: k must be >= 1 (got {spec!r})")
    return name, top_k


def router_change_is_exact(model: MambaMoEForCausalLM, spec: str) -> bool:
    """True when the new rule gives every token the same mixing weights (soft or top-E -> top-E / soft)."""
    cfg = model.config
    kind, k = parse_router(spec)
    everything = {"soft"} | ({"topk"} if cfg.moe_top_k == cfg.moe_num_experts else set())
    new_everything = kind == "soft" or (kind == "topk" and k == cfg.moe_num_experts)
    return cfg.moe_router in everything and new_everything


def change_router(model: MambaMoEForCausalLM, spec: str) -> MambaMoEForCausalLM:
    """The model with ``moe_router``/``moe_top_k`` set from ``spec`` ("topk:K", "soft" or "switch"), weights
    unchanged."""
    cfg = model.config
    if "moe" not in cfg.layer_ffns:
        raise GrowthError("layer_ffns: the model has no MoE layer, so there is no router to change")
    kind, k = parse_router(spec)
    if kind == "topk" and k > cfg.moe_num_experts:
        raise GrowthError(f"moe_top_k: topk:{k} needs at least {k} experts, the model has "
                          f"moe_num_experts={cfg.moe_num_experts}")
    same = kind == cfg.moe_router and (kind != "topk" or k == cfg.moe_top_k)
    if same:
        raise GrowthError(f"router: the model already routes with {spec!r}")
    new_cfg = cfg.replace(moe_router=kind, moe_top_k=k if kind == "topk" else cfg.moe_top_k)
    return rebuild(new_cfg, model, old_state(model))
