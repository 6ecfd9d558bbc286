"""Whole-model properties: causality, incremental decode == full forward, padding, persistence, sizes."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import MambaMoEConfig, MambaMoEForCausalLM, get_preset

ATTENTION_FORMS = [("gqa", "head"), ("diff", "head"), ("diff2", "head"), ("diff2", "token")]


def tiny(**overrides) -> MambaMoEForCausalLM:
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", **overrides))


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
@pytest.mark.parametrize("attn", ATTENTION_FORMS, ids=lambda a: "-".join(a))
@pytest.mark.parametrize("train", [False, True])
def test_changing_the_future_leaves_the_past(router, attn, train):
    model = tiny(moe_router=router, moe_top_k=2, attn_type=attn[0], diff2_lambda=attn[1]).train(train)
    ids = torch.randint(0, 512, (2, 29))
    t = int(torch.randint(3, 26, ()))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 512, changed[:, t + 1:].shape)
    with torch.no_grad():
        a = model(ids).logits
        b = model(changed).logits
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # the future does matter to the future


@pytest.mark.parametrize("router", ["soft", "topk"])
@pytest.mark.parametrize("attn", ATTENTION_FORMS, ids=lambda a: "-".join(a))
def test_incremental_decoding_equals_full_forward(router, attn):
    model = tiny(moe_router=router, moe_top_k=2, attn_type=attn[0], diff2_lambda=attn[1]).eval()
    ids = torch.randint(0, 512, (2, 41))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        # A prompt in pieces (chunked prefill), then token-by-token decode.
        cuts = [0, 13, 14, 30] + list(range(31, 42))
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in zip(cuts, cuts[1:], strict=False)]
    assert rel_error(torch.cat(pieces, 1), full) < 1e-4


def test_decode_state_of_mamba_layers_does_not_grow():
    model = tiny(layer_mixers=["mamba", "attention", "mamba", "mamba"]).eval()
    cache = model.new_cache(1)
    sizes = []
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 512, (1, 20)), cache=cache)
            sizes.append(cache.state_bytes())
    assert sizes[0]["mamba"] == sizes[1]["mamba"] == sizes[2]["mamba"] > 0
    assert sizes[0]["attention"] < sizes[1]["attention"] < sizes[2]["attention"]


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_left_and_right_padding_do_not_change_real_positions(router):
    model = tiny(moe_router=router, moe_top_k=2, moe_min_capacity=64).eval()
    lengths = [17, 9, 12]
    L, pad_id = max(lengths), 0
    seqs = [torch.randint(1, 512, (n,)) for n in lengths]
    with torch.no_grad():
        alone = [model(s[None]).logits[0] for s in seqs]
        for side in ("left", "right"):
            ids = torch.full((3, L), pad_id)
            mask = torch.zeros(3, L, dtype=torch.bool)
            for i, s in enumerate(seqs):
                span = slice(L - len(s), L) if side == "left" else slice(0, len(s))
                ids[i, span], mask[i, span] = s, True
            out = model(ids, attention_mask=mask).logits
            for i, s in enumerate(seqs):
                span = slice(L - len(s), L) if side == "left" else slice(0, len(s))
                assert rel_error(out[i, span], alone[i]) < 1e-4, side


def test_right_padded_prompt_then_decode_continues_each_row_exactly():
    model = tiny().eval()
    lengths = [11, 6]
    seqs = [torch.randint(1, 512, (n + 4,)) for n in lengths]  # prompt + 4 decoded tokens
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = seqs[i][:n], True
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids, attention_mask=mask, cache=cache)
        steps = [model(torch.stack([s[n + k] for s, n in zip(seqs, lengths, strict=True)])[:, None],
                       cache=cache).logits[:, 0] for k in range(4)]
        for i, n in enumerate(lengths):
            alone = model(seqs[i][None]).logits[0, n:n + 4]
            assert rel_error(torch.stack([s[i] for s in steps]), alone) < 1e-4


def test_loss_is_shifted_cross_entropy_and_ignores_padding():
    model = tiny().eval()
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, -3:] = False
    masked = model(ids, attention_mask=mask, labels=ids)
    manual = torch.nn.functional.cross_entropy(masked.logits[:, :6].reshape(-1, 512), ids[:, 1:7].reshape(-1))
    assert torch.allclose(masked.loss, manual)
    assert out.aux_loss > 0 and len(out.router_stats) == 4


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded = MambaMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_from_pretrained_names_mismatched_weights(tmp_path):
    tiny().save_pretrained(tmp_path)
    get_preset("mamba-moe-tiny", moe_expert_hidden_size=128).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="experts.up_proj"):
        MambaMoEForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MambaMoEForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_flagship_size_and_active_parameters():
    config = get_preset("mamba-moe-300m")
    with torch.device("meta"):  # count without allocating 1.2 GB
        model = MambaMoEForCausalLM(config)
    total = model.num_parameters()
    assert 290e6 <= total <= 310e6
    assert model.num_parameters(active=True) == total  # soft routing uses every expert
    with torch.device("meta"):
        r1 = MambaMoEForCausalLM(get_preset("mamba-r1"))
    experts = sum(p.numel() for n, p in r1.named_parameters() if ".experts." in n)
    assert r1.num_parameters() - r1.num_parameters(active=True) == experts * 7 // 8  # top-1 of 8


def test_tied_factorized_head_uses_embedding_factors():
    model = tiny()
    h = torch.randn(3, 64)
    expected = h @ model.embed.full_table().T
    assert rel_error(model.embed.logits(h), expected) < 1e-5
    assert model.lm_head is None


@pytest.mark.parametrize("bad, match", [
    (torch.randint(0, 512, (12,)), "input_ids"),
    (torch.randn(2, 12), "input_ids"),
    (torch.full((2, 12), 600), r"input_ids: token ids must lie in \[0, 512\)"),
])
def test_bad_inputs_say_what_was_expected(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny()(bad)


def test_bad_mask_labels_and_cache_are_named():
    model = tiny()
    ids = torch.randint(0, 512, (2, 12))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 11))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.new_cache(3))


def test_bf16_forward_is_finite_and_close_to_fp32():
    model = tiny().eval()
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(low).all()
    assert rel_error(low, ref) < 5e-2


def test_config_json_is_hf_style(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    import json
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "mamba_moe" and data["architectures"] == ["MambaMoEForCausalLM"]
    assert MambaMoEConfig.from_dict(data) == model.config


@pytest.mark.slow
def test_flagship_save_load_round_trip_is_exact(tmp_path):
    model = MambaMoEForCausalLM(get_preset("mamba-moe-300m"))
    model.save_pretrained(tmp_path)
    loaded = MambaMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_router_logits_stay_fp32_under_bf16_autocast(router, fresh_seed):
    """bf16 autocast must not reach the router: its logits are the fp32 product (top-k choices near a tie
    would flip in bf16), as the model states and as llama.cpp computes them (its router tensors stay f32)."""
    import torch.nn.functional as F

    from mamba_moe.model.ffn import MoEFeedForward

    torch.manual_seed(fresh_seed)
    config = get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2)
    ffn = MoEFeedForward(config)
    tokens = torch.randn(64, config.d_model)
    reference = F.linear(tokens, ffn.router.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = ffn._route(tokens, None)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, reference)
