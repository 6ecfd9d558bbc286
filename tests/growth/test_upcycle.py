"""--dense-to-moe: dense FFNs upcycled into copied experts keep the logits for soft and top-k routing
(fp64 1e-10), on a transformer-baseline-shaped model and on an imported HF Mamba2 checkpoint."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.growth import GrowthError, dense_to_moe

# transformer-baseline's layout (all attention, dense SwiGLU, untied head), shrunk for 2 cores.
BASELINE = dict(vocab_size=512, d_model=64, n_layers=3, layer_mixers=["attention"] * 3, layer_ffns=["dense"] * 3,
                attn_num_heads=4, attn_num_kv_heads=4, attn_head_dim=16, ffn_hidden_size=96,
                max_position_embeddings=256)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("router", ["soft", "topk:1", "topk:2"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_baseline_upcycled_keeps_logits(make_model, ids, router, activation):
    model = make_model("transformer-baseline", ffn_activation=activation, **BASELINE)
    grown = dense_to_moe(model, 4, router=router)
    c = grown.config
    assert c.layer_ffns == ["moe"] * 3 and c.moe_num_experts == 4 and c.moe_expert_hidden_size == 96
    assert c.moe_router == router.split(":")[0]
    layer = grown.backbone.layers[0].ffn
    assert torch.equal(layer.experts.up_proj, model.backbone.layers[0].ffn.up_proj.weight.expand(4, -1, -1))
    assert float(layer.router.weight.detach().abs().max()) > 0    # random router: the copies diverge in training
    err = rel_error(logits(grown, ids), logits(model, ids))
    print(f"{router} {activation}: rel. error {err:.2e}")
    assert err < 1e-10


def test_shared_expert_starts_silent(make_model, ids):
    model = make_model("transformer-baseline", moe_shared_expert_hidden_size=32, **BASELINE)
    grown = dense_to_moe(model, 2)
    assert grown.backbone.layers[0].ffn.shared_expert is not None
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-10


def test_mixed_model_fills_dense_and_empty_layers(make_model, ids):
    model = make_model(layer_ffns=["moe", "dense", "none", "dense"], ffn_hidden_size=64)
    grown = dense_to_moe(model, 4)
    assert grown.config.layer_ffns == ["moe"] * 4
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-10
    kept = dense_to_moe(model, 4, fill_empty=False)
    assert kept.config.layer_ffns == ["moe", "moe", "none", "moe"]
    with pytest.raises(GrowthError, match=r"^moe_num_experts: the model's existing MoE layers have"):
        dense_to_moe(model, 8)
    wide = make_model(layer_ffns=["moe", "dense", "moe", "moe"], ffn_hidden_size=96)
    with pytest.raises(GrowthError, match=r"^moe_expert_hidden_size: "):
        dense_to_moe(wide, 4)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="HF's pure-torch Mamba2 path needed")
def test_imported_hf_mamba2_becomes_a_hybrid(tmp_path, ids):
    transformers = pytest.importorskip("transformers")
    from mamba_moe.convert import load_hf_mamba2

    hf_config = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8,
                                          expand=2, vocab_size=512, chunk_size=8, conv_kernel=4, n_groups=2)
    hf = transformers.Mamba2ForCausalLM(hf_config)
    with torch.no_grad():
        for name, param in hf.named_parameters():  # HF leaves norms and D at 1
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    hf.save_pretrained(tmp_path / "hf")
    imported = load_hf_mamba2(tmp_path / "hf").double().eval()
    assert imported.config.layer_ffns == ["none", "none"]
    grown = dense_to_moe(imported, 4, router="topk:2", expert_hidden=32)
    assert grown.config.layer_ffns == ["moe", "moe"] and grown.config.moe_expert_hidden_size == 32
    err = rel_error(logits(grown, ids), logits(imported, ids))
    print(f"HF Mamba2 -> MoE hybrid: rel. error {err:.2e}")
    assert err < 1e-10
    grown.train()(ids, labels=ids).loss.backward()  # the silent experts learn from the first step
    assert float(grown.backbone.layers[0].ffn.experts.down_proj.grad.abs().max()) > 0


def test_errors_name_the_field(make_model):
    baseline = make_model("transformer-baseline", **BASELINE)
    with pytest.raises(GrowthError, match=r"^moe_router: 'switch'"):
        dense_to_moe(baseline, 4, router="switch")
    with pytest.raises(GrowthError, match=r"^moe_top_k: 5 experts per token"):
        dense_to_moe(baseline, 4, router="topk:5")
    with pytest.raises(GrowthError, match=r"^router: 'top' is not one of"):
        dense_to_moe(baseline, 4, router="top:2")
    with pytest.raises(GrowthError, match=r"^expert_hidden: upcycled experts are copies"):
        dense_to_moe(baseline, 4, expert_hidden=32)
    with pytest.raises(GrowthError, match=r"^dense_to_moe: expected an integer >= 1"):
        dense_to_moe(baseline, 0)
    with pytest.raises(GrowthError, match=r"^layer_ffns: no dense FFN to upcycle"):
        dense_to_moe(make_model(), 4)
