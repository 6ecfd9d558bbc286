"""--add-experts: copies with the router's mass split between them keep the logits (fp64 1e-10, fp32 1e-5)."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.growth import GrowthError, add_experts

ROUTERS = {
    "soft": {"moe_router": "soft"},
    "topk": {"moe_router": "topk", "moe_top_k": 2},
    # capacity above every call's token count: the grown model is exact when the source drops nothing
    "switch": {"moe_router": "switch", "moe_capacity_factor": 8.0},
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = [("soft", "split", "swiglu"), ("soft", "copy", "swiglu"), ("soft", "split", "gelu"),
         ("topk", "split", "swiglu"), ("topk", "copy", "gelu"), ("switch", "copy", "swiglu")]


@pytest.mark.parametrize(("router", "init", "activation"), CASES)
def test_add_experts_keeps_logits_fp64(make_model, ids, router, init, activation):
    model = make_model(ffn_activation=activation, **ROUTERS[router])
    E = model.config.moe_num_experts
    for n_new in (E, 2 * E) if init == "split" else (E,):
        grown = add_experts(model, n_new, init=init)
        assert grown.config.moe_num_experts == E + n_new
        m = 1 + n_new // E
        if router == "topk":
            assert grown.config.moe_top_k == m * model.config.moe_top_k
        if router == "switch":
            assert grown.config.moe_capacity_factor == m * model.config.moe_capacity_factor
        err = rel_error(logits(grown, ids), logits(model, ids))
        print(f"{router} {init} {activation} +{n_new}: rel. error {err:.2e}")
        assert err < 1e-10


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_add_experts_keeps_logits_fp32(make_model, ids, router):
    model = make_model(dtype=torch.float32, **ROUTERS[router])
    grown = add_experts(model, model.config.moe_num_experts)
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-5


def test_layout_of_the_copies(make_model):
    model = make_model()
    E = model.config.moe_num_experts
    grown = add_experts(model, 2 * E, init="split")
    for old, new in zip(model.backbone.layers, grown.backbone.layers, strict=True):
        w, g = old.ffn.router.weight, new.ffn.router.weight
        assert torch.equal(g, w.repeat(3, 1))                              # copy c of e at c * E + e
        assert torch.equal(new.ffn.experts.up_proj, old.ffn.experts.up_proj.repeat(3, 1, 1))
        down = new.ffn.experts.down_proj.view(3, E, *old.ffn.experts.down_proj.shape[1:])
        assert not torch.equal(down[0], down[1])                           # split: the copies differ ...
        assert rel_error(down.mean(0), old.ffn.experts.down_proj) < 1e-12  # ... and average to the original
        assert torch.equal(new.ffn.shared_expert.down_proj.weight, old.ffn.shared_expert.down_proj.weight)


def test_split_copies_get_different_gradients(make_model, ids):
    """Exact twins would train as twins forever under soft routing; split ones do not."""
    model = make_model()
    E = model.config.moe_num_experts
    for init, differ in (("split", True), ("copy", False)):
        grown = add_experts(model, E, init=init).train()
        out = grown(ids, labels=ids)
        out.loss.backward()
        ffn = grown.backbone.layers[0].ffn
        for grad in (ffn.router.weight.grad, ffn.experts.up_proj.grad):
            gap = float((grad[:E] - grad[E:]).abs().max() / grad.abs().max())
            assert (gap > 1e-6) == differ, (init, gap)


def test_noise_is_close_but_not_exact(make_model, ids):
    model = make_model()
    grown = add_experts(model, model.config.moe_num_experts, init="noise", scale=0.01)
    err = rel_error(logits(grown, ids), logits(model, ids))
    assert 1e-8 < err < 1e-2
    bank = grown.backbone.layers[0].ffn.experts
    E = model.config.moe_num_experts
    assert torch.equal(bank.up_proj[:E], model.backbone.layers[0].ffn.experts.up_proj)  # originals untouched


def test_switch_with_drops_drops_fewer(make_model):
    """With capacity binding, the copies share an expert's tokens: never more drops than the source. One MoE
    layer, so that both models route the same inputs (behind it, fewer drops would change the inputs)."""
    model = make_model(moe_router="switch", moe_capacity_factor=1.0, moe_min_capacity=0,
                       layer_ffns=["none", "moe", "none", "none"])
    grown = add_experts(model, model.config.moe_num_experts, init="copy")
    ids = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        before = sum(int(s.dropped_tokens) for s in model(ids).router_stats)
        after = sum(int(s.dropped_tokens) for s in grown(ids).router_stats)
    assert before > 0 and after <= before


def test_errors_name_the_field(make_model):
    model = make_model()
    with pytest.raises(GrowthError, match=r"^add_experts: 3 new experts .* multiple of 4 \(4\)"):
        add_experts(model, 3)
    with pytest.raises(GrowthError, match=r"^add_experts: expected an integer >= 1"):
        add_experts(model, 0)
    with pytest.raises(GrowthError, match=r"^init: 'twin' is not one of"):
        add_experts(model, 4, init="twin")
    switch = make_model(moe_router="switch")
    with pytest.raises(GrowthError, match=r"^init: 'split' .* switch"):
        add_experts(switch, 4, init="split")
    dense = make_model(layer_ffns=["dense"] * 4)
    with pytest.raises(GrowthError, match=r"^layer_ffns: the model has no MoE layer"):
        add_experts(dense, 4)
