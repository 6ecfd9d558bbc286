"""The model's decode step (``decode``/``step``) and the fast decoder (packed, int8 weights) against the model's
forward, their reference."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.batch import DecodeBatch
from mamba_moe.inference.core.request import Request
from mamba_moe.inference.decoders.fast_decode import FastDecoder
from mamba_moe.model.cache import MambaState
from mamba_moe.model.ffn import ExpertBank, PackedExperts
from mamba_moe.ops.conv import causal_conv1d_step
from mamba_moe.ops.ssd import ssd_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> MambaMoEForCausalLM:
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", **overrides)).double().eval()


def prompts(vocab: int, lengths=(7, 3, 11, 5)) -> list[list[int]]:
    return [torch.randint(4, vocab, (n,)).tolist() for n in lengths]


ROUTERS = ["soft", "topk", "switch"]
ATTENTION = ["gqa", "diff", "diff2"]


@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_greedy_equals_the_model_token_for_token(router, attn, ngroups):
    # float64, so summation order cannot flip an argmax. max_batch 2 < 4 prompts: rows join and leave.
    # A dense layer beside the MoE ones; ngroups > 1 exercises the grouped B/C of the SSM step.
    model = tiny(moe_router=router, attn_type=attn, ssm_ngroups=ngroups, layer_ffns=["moe", "dense", "moe", "moe"])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batch = prompts(model.config.vocab_size)
    reference = [c.token_ids for c in Engine(model, max_batch=2).generate(batch, params)]
    fast = [c.token_ids for c in Engine(model, max_batch=2, decoder="fast").generate(batch, params)]
    assert fast == reference


@pytest.mark.parametrize("ngroups", [1, 4])
@pytest.mark.parametrize("router", ROUTERS)
def test_model_decode_equals_its_forward_and_keeps_autograd(router, ngroups):
    """``decode`` on a cache == the forward on the same cache, logits and states; with autograd too."""
    model = tiny(moe_router=router, ssm_ngroups=ngroups)
    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        ref_cache, cache = model.new_cache(3), model.new_cache(3)
        model(ids[:, :6], cache=ref_cache)
        model(ids[:, :6], cache=cache)
        for t in range(6, 9):
            ref = model(ids[:, t:t + 1], cache=ref_cache, router_stats=False).logits[:, -1]
            out = model.decode(ids[:, t:t + 1], cache)
            assert rel_error(out, ref) < 1e-12
    for a, b in zip(cache.layers, ref_cache.layers, strict=True):
        if isinstance(a, MambaState):
            assert rel_error(a.ssm, b.ssm) < 1e-12 and rel_error(a.conv, b.conv) < 1e-12
    # With autograd the state is replaced, not written in place, so the step is differentiable.
    cache = model.new_cache(1)
    model(ids[:1, :4], cache=cache)
    logits = model.decode(ids[:1, 4:5], cache)
    logits.sum().backward()
    grad = model.backbone.layers[0].mixer.in_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_decode_notices_changed_ssm_parameters():
    """The step's cached SSM constants follow in-place parameter updates (an optimizer step, a load)."""
    model = tiny()
    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        for _ in range(2):
            ref_cache, cache = model.new_cache(2), model.new_cache(2)
            model(ids[:, :5], cache=ref_cache)
            model(ids[:, :5], cache=cache)
            ref = model(ids[:, 5:], cache=ref_cache).logits[:, -1]
            assert rel_error(model.decode(ids[:, 5:], cache), ref) < 1e-12
            for layer in model.backbone.layers:
                if layer.mixer_kind == "mamba":
                    layer.mixer.A_log.add_(0.5)
                    layer.mixer.dt_bias.mul_(0.5)
                    layer.mixer.D.add_(1.0)


def test_decode_rejects_a_wrong_token_shape():
    model = tiny()
    with pytest.raises(ValueError, match="input_ids"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), model.new_cache(1))


def test_fast_step_logits_and_state_equal_the_models():
    model = tiny(moe_router="topk")
    vocab = model.config.vocab_size
    runs = {}
    for name, decoder in (("model", None), ("fast", FastDecoder(model))):
        torch.manual_seed(1)
        batch = DecodeBatch(model, decoder=decoder)
        batch.add([Request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), vocab_size=vocab)
                   for p in prompts(vocab, (6, 2, 9))])
        logits = []
        with torch.inference_mode():
            for _ in range(5):
                tokens = torch.tensor([[r.output_ids[-1]] for r in batch.rows])
                logits.append(decoder(tokens, batch.cache) if decoder is not None
                              else batch._last_logits(tokens, None, batch.cache))
                for r, t in zip(batch.rows, logits[-1].argmax(-1).tolist(), strict=True):
                    r.accept(t)
        runs[name] = (torch.stack(logits), batch.cache)
    (ref, ref_cache), (out, out_cache) = runs["model"], runs["fast"]
    assert rel_error(out, ref) < 1e-10
    assert torch.equal(out_cache.key_mask, ref_cache.key_mask) and torch.equal(out_cache.positions, ref_cache.positions)
    for a, b in zip(out_cache.layers, ref_cache.layers, strict=True):
        if isinstance(a, MambaState):
            assert rel_error(a.ssm, b.ssm) < 1e-10 and rel_error(a.conv, b.conv) < 1e-10
        else:
            assert rel_error(a.key, b.key) < 1e-10 and rel_error(a.value, b.value) < 1e-10


def test_decode_updates_mamba_state_in_place_without_growth():
    model = tiny()
    decoder = FastDecoder(model)
    batch = DecodeBatch(model, decoder=decoder)
    batch.add([Request([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                       vocab_size=model.config.vocab_size)])
    batch.step()  # the first step may make a prefill's strided SSM state contiguous, once
    states = [s for s in batch.cache.layers if isinstance(s, MambaState)]
    pointers = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states]
    mask_buffer = None
    for _ in range(10):
        batch.step()
        assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states] == pointers
        # the key mask is a view of one preallocated buffer, not a new concatenation per step
        mask_buffer = mask_buffer or batch.cache.key_mask.data_ptr()
        assert batch.cache.key_mask.data_ptr() == mask_buffer


def test_in_place_ssd_and_conv_steps_equal_the_functional_ones():
    b, h, p, n, g, c, k = 2, 6, 4, 8, 3, 10, 4
    state = torch.randn(b, h, p, n, dtype=torch.float64)
    x, dt, A = torch.randn(b, h, p, dtype=torch.float64), torch.rand(b, h, dtype=torch.float64), -torch.rand(h)
    B, C, D = torch.randn(b, g, n, dtype=torch.float64), torch.randn(b, g, n, dtype=torch.float64), torch.randn(h)
    y_ref, s_ref = ssd_step(state, x, dt, A, B, C, D)
    inplace = state.clone()
    y, s = ssd_step(inplace, x, dt, A, B, C, D, inplace=True)
    assert s is inplace and rel_error(y, y_ref) < 1e-12 and rel_error(s, s_ref) < 1e-12
    conv, xc, w, bias = torch.randn(b, c, k - 1), torch.randn(b, c), torch.randn(c, k), torch.randn(c)
    y_ref, s_ref = causal_conv1d_step(xc, conv, w, bias)
    inplace = conv.clone()
    y, s = causal_conv1d_step(xc, inplace, w, bias, inplace=True)
    assert s is inplace and torch.equal(y, y_ref) and torch.equal(s, s_ref)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="int8 needs fbgemm (x86)")
@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_fast_int8_stays_close_to_the_float_model(router):
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_router=router, tie_word_embeddings=router == "soft",
                                            embedding_rank=16 if router == "soft" else 0)).eval()
    vocab = model.config.vocab_size
    logits = {}
    for name, decoder in (("float", FastDecoder(model)), ("int8", FastDecoder(model, int8=True))):
        batch = DecodeBatch(model, decoder=decoder)
        batch.add([Request(p, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), vocab_size=vocab)
                   for p in [[5, 9, 40, 7], [11, 3]]])
        with torch.inference_mode():
            tokens = torch.tensor([[r.output_ids[-1]] for r in batch.rows])
            logits[name] = decoder(tokens, batch.cache)
    # Int8 weights and 7-bit dynamic activations: a few percent of the logit range (the bound of
    # tests/inference/test_quantize.py for the whole-model int8 path).
    assert rel_error(logits["int8"], logits["float"]) < 0.25
    out = Engine(model, decoder="fast-int8").generate([[5, 9, 40, 7], [11, 3]],
                                                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [6, 6]


def test_bad_decoder_name_is_rejected():
    with pytest.raises(ValueError, match="decoder"):
        Engine(tiny(), decoder="turbo")


def test_fast_decoder_is_a_weight_transform_of_an_untouched_model():
    """The decoder's model shares every untransformed tensor with the original; the original keeps its layout."""
    model = tiny(moe_router="topk")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = FastDecoder(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())       # the original stays trainable
    assert any(isinstance(m, ExpertBank) for m in model.modules())
    assert not any(isinstance(m, ExpertBank) for m in decoder.model.modules())
    assert any(isinstance(m, PackedExperts) for m in decoder.model.modules())
    assert decoder.model.embed.weight is model.embed.weight
    assert decoder.model.backbone.layers[0].mixer.in_proj.weight is model.backbone.layers[0].mixer.in_proj.weight


def test_packed_experts_equal_the_bank_for_every_router():
    """PackedExperts.mix == the layer's reference dispatch (all_experts / mix_sparse + shared) in float64."""
    for router in ROUTERS:
        layer = tiny(moe_router=router).backbone.layers[0].ffn
        x = torch.randn(2, 5, layer.router.in_features, dtype=torch.float64)
        with torch.no_grad():
            ref = layer.step(x)
            layer.pack()
            out = layer.step(x)
        assert rel_error(out, ref) < 1e-12, router
