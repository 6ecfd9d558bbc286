"""``--add-layers N --at I``: new layers that start as the identity.

A block computes ``h + mixer(norm(h))`` then ``h + ffn(norm(h))``, so zeroing the projection that writes
into the residual stream makes it the identity: the mixer's ``out_proj`` (Mamba2) or ``o_proj``
(attention), the dense FFN's ``down_proj``, the experts' stacked ``down_proj`` and the shared expert's
``down_proj``. Every other weight of a new layer is freshly initialised, so the first gradient step moves
the zeroed projections (their gradient is the product of the residual gradient and the non-zero inner
activations) and the layer then learns.

The one thing that depends on a layer's position is the 2024 differential attention (``attn_type: diff``):
``lambda_init = 0.8 - 0.6 exp(-0.3 i)`` of its index i, used in ``lambda = exp(q1.k1) - exp(q2.k2) +
lambda_init`` and in the output scale ``1 - lambda_init``. Layers after the insertion point move from index
i to i + N, so their ``lambda_q2`` is moved along ``lambda_k2`` to keep lambda, and their ``subln`` weight is
scaled by ``(1 - lambda_init(i)) / (1 - lambda_init(i + N))`` to keep the scale: exact up to rounding.
``gqa`` and ``diff2`` do not depend on the index.
"""

from __future__ import annotations

import math

import torch

from ..config import FFNS, MIXERS
from ..model.lm import MambaMoEForCausalLM
from ..ops.diff_attention import diff_lambda_init
from .common import GrowthError, check_count, fresh_model, old_state

_LAYER = "backbone.layers."


def _zero_outputs(state: dict, prefix: str, mixer: str, ffn: str) -> None:
    """Zero the residual-stream writers of the new layer at ``prefix``."""
    keys = [prefix + ("mixer.out_proj.weight" if mixer == "mamba" else "mixer.o_proj.weight")]
    if ffn == "dense":
        keys.append(prefix + "ffn.down_proj.weight")
    elif ffn == "moe":
        keys += [prefix + "ffn.experts.down_proj", prefix + "ffn.shared_expert.down_proj.weight"]
    for key in keys:
        if key in state:
            state[key] = torch.zeros_like(state[key])


def _move_diff_layer(state: dict, prefix: str, old_index: int, new_index: int) -> None:
    """Keep a ``diff`` attention layer's lambda and output scale when its index changes (module docstring)."""
    a, b = diff_lambda_init(old_index), diff_lambda_init(new_index)
    if a == b:
        return
    q1, k1 = state[prefix + "mixer.lambda_q1"], state[prefix + "mixer.lambda_k1"]
    q2, k2 = state[prefix + "mixer.lambda_q2"], state[prefix + "mixer.lambda_k2"]
    # lambda = e1 - e2 + lambda_init must stay: e2 grows by b - a (> 0 as lambda_init grows with depth), which
    # keeps e2 positive; fall back to lowering e1 when k2 is all zero.
    if float(k2.double().norm()) > 0:
        dot = float(q2.double() @ k2.double())
        shift = math.log(math.exp(dot) + (b - a)) - dot
        new = q2.double() + shift * k2.double() / float(k2.double() @ k2.double())
        state[prefix + "mixer.lambda_q2"] = new.to(q2.dtype)
    else:
        dot = float(q1.double() @ k1.double())
        target = math.exp(dot) - (b - a)
        if target <= 0 or float(k1.double().norm()) == 0:
            raise GrowthError(f"at: the diff attention layer {old_index} cannot be moved to index {new_index} "
                              "without changing its output (its lambda vectors are zero)")
        shift = math.log(target) - dot
        state[prefix + "mixer.lambda_q1"] = (q1.double() + shift * k1.double() / float(k1.double() @ k1.double())
                                             ).to(q1.dtype)
    key = prefix + "mixer.subln.weight"
    state[key] = (state[key].double() * ((1.0 - a) / (1.0 - b))).to(state[key].dtype)


def add_layers(model: MambaMoEForCausalLM, n_new: int, at: int, mixer: str = "mamba", ffn: str | None = None,
               seed: int | None = None) -> MambaMoEForCausalLM:
    """A new model with ``n_new`` identity layers inserted before layer ``at`` (``at = n_layers`` appends).

    ``mixer``: "mamba" or "attention"; ``ffn``: "moe", "dense" or "none" (default: the FFN kind of the layer
    now at ``at``, or of the last layer when appending). New layers use the model's config for their sizes.
    """
    cfg = model.config
    check_count("add_layers", n_new)
    if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= cfg.n_layers:
        raise GrowthError(f"at: layer index {at!r} out of range; new layers go before layer 0..{cfg.n_layers - 1} "
                          f"or, with {cfg.n_layers}, after the last (n_layers={cfg.n_layers})")
    if mixer not in MIXERS:
        raise GrowthError(f"mixer: {mixer!r} is not one of {list(MIXERS)}")
    if ffn is None:
        ffn = cfg.layer_ffns[min(at, cfg.n_layers - 1)]
    if ffn not in FFNS:
        raise GrowthError(f"ffn: {ffn!r} is not one of {list(FFNS)}")
    new_cfg = cfg.replace(n_layers=cfg.n_layers + n_new,
                          layer_mixers=cfg.layer_mixers[:at] + [mixer] * n_new + cfg.layer_mixers[at:],
                          layer_ffns=cfg.layer_ffns[:at] + [ffn] * n_new + cfg.layer_ffns[at:])

    grown = fresh_model(new_cfg, model, seed)
    state = grown.state_dict()
    state = {k: v.detach().clone() for k, v in state.items()}
    for key, value in old_state(model).items():
        if key.startswith(_LAYER):
            index, rest = key[len(_LAYER):].split(".", 1)
            i = int(index)
            key = f"{_LAYER}{i if i < at else i + n_new}.{rest}"
        state[key] = value
    for j in range(at, at + n_new):
        _zero_outputs(state, f"{_LAYER}{j}.", mixer, ffn)
    if cfg.attn_type == "diff":
        for i in range(at, cfg.n_layers):
            if cfg.layer_mixers[i] == "attention":
                _move_diff_layer(state, f"{_LAYER}{i + n_new}.", i, i + n_new)
    grown.load_state_dict(state, strict=True)
    grown.train(model.training)
    return grown
