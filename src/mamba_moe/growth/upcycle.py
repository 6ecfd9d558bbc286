"""``--dense-to-moe E``: sparse upcycling (Komatsuzaki et al. 2023) of dense FFNs into E experts.

Each dense FFN becomes an MoE layer whose E experts are copies of it. For the ``soft`` and ``topk`` routers
the mixing weights of a token sum to 1, so the layer's output is ``sum_e w_e FFN(x) = FFN(x)`` for *any*
router: the router is freshly initialised (random, not zero), which makes the experts receive differently
weighted gradients from the first step, so they diverge, and the router then learns to tell them apart.
The ``switch`` router weights its expert by the raw top-1 probability and drops tokens past capacity, so no
initialisation reproduces the dense FFN: it is refused.

Layers with no FFN at all (a HF Mamba2 import has none) get an MoE FFN whose experts' ``down_proj`` is zero
(and the shared expert's, if the config has one): the layer's output is unchanged, and the experts, their
other weights freshly initialised, learn from the first step. ``fill_empty=False`` leaves them without FFN.
"""

from __future__ import annotations

from ..model.lm import MambaMoEForCausalLM
from .common import GrowthError, check_count, old_state, rebuild
from .router import parse_router


def dense_to_moe(model: MambaMoEForCausalLM, num_experts: int, router: str | None = None,
                 fill_empty: bool = True, expert_hidden: int | None = None,
                 seed: int | None = None) -> MambaMoEForCausalLM:
    """A new model whose dense FFNs (and, with ``fill_empty``, FFN-less layers) are MoE layers of
    ``num_experts`` experts. ``router``: "soft" or "topk:K" (default: the config's ``moe_router`` and
    ``moe_top_k``). ``expert_hidden``: the experts' width when no dense FFN fixes it (FFN-less layers only)."""
    cfg = model.config
    check_count("dense_to_moe", num_experts)
    dense = [i for i, kind in enumerate(cfg.layer_ffns) if kind == "dense"]
    empty = [i for i, kind in enumerate(cfg.layer_ffns) if kind == "none"] if fill_empty else []
    if not dense and not empty:
        raise GrowthError("layer_ffns: no dense FFN to upcycle" + ("" if fill_empty else " and fill_empty is off")
                          + f" (layer_ffns={cfg.layer_ffns})")
    kind, top_k = parse_router(router) if router is not None else (cfg.moe_router, cfg.moe_top_k)
    if kind == "switch":
        raise GrowthError("moe_router: 'switch' weights its one expert by the raw router probability and drops "
                          "tokens past capacity, so upcycled copies cannot reproduce the dense FFN; use soft or "
                          "topk:K (and --router switch afterwards if wanted)")
    if kind == "topk" and top_k > num_experts:
        raise GrowthError(f"moe_top_k: {top_k} experts per token, but only {num_experts} experts (dense_to_moe)")
    if expert_hidden is not None:
        check_count("expert_hidden", expert_hidden)
    if dense:
        hidden = cfg.ffn_hidden_size
        if expert_hidden is not None and expert_hidden != hidden:
            raise GrowthError(f"expert_hidden: upcycled experts are copies of the dense FFN and keep its width "
                              f"ffn_hidden_size={hidden}, got {expert_hidden}")
    else:
        hidden = cfg.moe_expert_hidden_size if expert_hidden is None else expert_hidden
    if "moe" in cfg.layer_ffns:  # every MoE layer shares the config's expert count, width and router
        for name, want, have in (("moe_num_experts", num_experts, cfg.moe_num_experts),
                                 ("moe_expert_hidden_size", hidden, cfg.moe_expert_hidden_size),
                                 ("moe_router", kind, cfg.moe_router)):
            if want != have:
                raise GrowthError(f"{name}: the model's existing MoE layers have {name}={have!r}, the upcycled "
                                  f"ones would have {want!r}; every MoE layer shares one value")

    targets = set(dense) | set(empty)
    new_cfg = cfg.replace(layer_ffns=["moe" if i in targets else f for i, f in enumerate(cfg.layer_ffns)],
                          moe_num_experts=num_experts, moe_expert_hidden_size=hidden, moe_router=kind,
                          moe_top_k=top_k if kind == "topk" else cfg.moe_top_k)
    state = old_state(model)
    zeroed = {}
    for i in dense:
        prefix = f"backbone.layers.{i}.ffn."
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = state.pop(f"{prefix}{name}.weight", None)
            if w is not None:  # GELU FFNs have no gate
                state[f"{prefix}experts.{name}"] = w.unsqueeze(0).repeat(num_experts, 1, 1)
    for i in empty:
        zeroed[f"backbone.layers.{i}.ffn.experts.down_proj"] = None
    for i in targets:  # a shared expert (if configured) starts silent: the copies already give FFN(x)
        zeroed[f"backbone.layers.{i}.ffn.shared_expert.down_proj.weight"] = None
    grown = rebuild(new_cfg, model, state, seed)
    params = dict(grown.named_parameters())
    for key in zeroed:
        if key in params:
            params[key].data.zero_()
    return grown
