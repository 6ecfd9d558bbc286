"""The fused decode step (inference/fast_decode.py) against the model's own forward, its reference."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.batch import DecodeBatch
from mamba_moe.inference.fast_decode import FastDecoder
from mamba_moe.inference.request import Request
from mamba_moe.model.cache import MambaState
from mamba_moe.ops.conv import causal_conv1d_step
from mamba_moe.ops.ssd import ssd_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> MambaMoEForCausalLM:
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", **overrides)).double().eval()


def prompts(vocab: int, lengths=(7, 3, 11, 5)) -> list[list[int]]:
    return [torch.randint(4, vocab, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("router,attn", [("soft", "diff2"), ("topk", "gqa"), ("topk", "diff"), ("switch", "diff2")])
def test_fast_greedy_equals_the_model_token_for_token(router, attn):
    # float64, so summation order cannot flip an argmax. max_batch 2 < 4 prompts: rows join and leave.
    model = tiny(moe_router=router, attn_type=attn, layer_ffns=["moe", "dense", "moe", "moe"])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batch = prompts(model.config.vocab_size)
    reference = [c.token_ids for c in Engine(model, max_batch=2).generate(batch, params)]
    fast = [c.token_ids for c in Engine(model, max_batch=2, decoder="fast").generate(batch, params)]
    assert fast == reference


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
@pytest.mark.parametrize("router", ["soft", "topk"])
def test_fast_int8_stays_close_to_the_float_model(router):
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_router=router)).eval()
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
    # tests/test_inference_quantize.py for the whole-model int8 path).
    assert rel_error(logits["int8"], logits["float"]) < 0.25
    out = Engine(model, decoder="fast-int8").generate([[5, 9, 40, 7], [11, 3]],
                                                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [6, 6]


def test_bad_decoder_name_is_rejected():
    with pytest.raises(ValueError, match="decoder"):
        Engine(tiny(), decoder="turbo")
