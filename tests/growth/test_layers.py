"""--add-layers: identity layers (zeroed output projections) keep the logits, for every mixer, FFN and
attention form, at every insertion point (fp64 1e-10); the zeroed projections receive gradient."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.growth import GrowthError, add_layers

ATTENTION = {"gqa": {"attn_type": "gqa"}, "diff2": {"attn_type": "diff2"},
             "diff2-token": {"attn_type": "diff2", "diff2_lambda": "token"},
             "diff": {"attn_type": "diff", "attn_num_heads": 2, "attn_head_dim": 16}}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_add_layers_keeps_logits(make_model, ids, attention):
    model = make_model(**ATTENTION[attention])
    ref = logits(model, ids)
    n_layers = model.config.n_layers
    cases = [(0, "attention", "moe"), (1, "mamba", "dense"), (2, "attention", "none"), (n_layers, "mamba", None)]
    for at, mixer, ffn in cases:
        grown = add_layers(model, 2, at, mixer=mixer, ffn=ffn)
        c = grown.config
        assert c.n_layers == n_layers + 2 and c.layer_mixers[at:at + 2] == [mixer] * 2
        assert c.layer_ffns[at:at + 2] == [ffn or model.config.layer_ffns[min(at, n_layers - 1)]] * 2
        err = rel_error(logits(grown, ids), ref)
        print(f"{attention}: 2 x {mixer}/{ffn} at {at}: rel. error {err:.2e}")
        assert err < 1e-10


def test_diff_layers_moved_deeper_keep_lambda(make_model, ids):
    """``diff``'s lambda_init depends on the layer index: the moved layers are compensated, not left alone."""
    model = make_model(**ATTENTION["diff"])
    grown = add_layers(model, 3, 0)
    old, new = model.backbone.layers[1].mixer, grown.backbone.layers[4].mixer
    assert new.lambda_init != old.lambda_init
    lam_old = old.diff_lambda_value()
    assert rel_error(new.diff_lambda_value(), lam_old) < 1e-12
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-10


def test_add_layers_fp32(make_model, ids):
    model = make_model(dtype=torch.float32)
    grown = add_layers(model, 1, 2, mixer="attention", ffn="moe")
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-5


def test_new_layers_learn(make_model, ids):
    model = make_model()
    grown = add_layers(model, 1, 1, mixer="mamba", ffn="moe").train()
    grown(ids, labels=ids).loss.backward()
    layer = grown.backbone.layers[1]
    for name in ("mixer.out_proj.weight", "ffn.experts.down_proj", "ffn.shared_expert.down_proj.weight"):
        param = layer.get_parameter(name)
        assert float(param.detach().abs().max()) == 0.0, name        # starts silent ...
        assert float(param.grad.abs().max()) > 0.0, name             # ... and is moved by the first step


def test_grown_model_decodes_like_the_source(make_model):
    model = make_model()
    grown = add_layers(model, 1, 2, mixer="attention", ffn="dense")
    prompt = torch.randint(0, 512, (2, 7))
    for m in (model, grown):
        m.eval()
    cache_a, cache_b = model.new_cache(2), grown.new_cache(2)
    with torch.no_grad():
        a, b = model(prompt, cache=cache_a).logits[:, -1], grown(prompt, cache=cache_b).logits[:, -1]
        for _ in range(3):
            assert rel_error(b, a) < 1e-10
            token = a.argmax(-1, keepdim=True)
            a, b = model.decode(token, cache_a), grown.decode(token, cache_b)
    assert rel_error(b, a) < 1e-10


def test_errors_name_the_field(make_model):
    model = make_model()
    with pytest.raises(GrowthError, match=r"^at: layer index 5 out of range"):
        add_layers(model, 1, 5)
    with pytest.raises(GrowthError, match=r"^at: layer index -1 out of range"):
        add_layers(model, 1, -1)
    with pytest.raises(GrowthError, match=r"^add_layers: expected an integer >= 1"):
        add_layers(model, 0, 1)
    with pytest.raises(GrowthError, match=r"^mixer: 'lstm' is not one of"):
        add_layers(model, 1, 1, mixer="lstm")
    with pytest.raises(GrowthError, match=r"^ffn: 'sparse' is not one of"):
        add_layers(model, 1, 1, ffn="sparse")
