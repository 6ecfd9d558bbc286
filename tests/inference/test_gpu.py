"""CUDA-graph decode (inference/decoders/cuda_graphs.py) against eager decode, token for token. Needs CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.batch import DecodeBatch
from mamba_moe.inference.core.request import Request
from mamba_moe.inference.decoders.cuda_graphs import GraphDecoder
from mamba_moe.inference.decoders.fast_decode import FastDecoder

pytestmark = pytest.mark.gpu


def tiny(router: str, dtype: torch.dtype, **overrides) -> MambaMoEForCausalLM:
    # mamba-moe-tiny: Mamba2 and diff2 attention layers, every FFN a MoE (+ shared expert).
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_router=router, **overrides))
    return model.to("cuda", dtype).eval()


@pytest.mark.parametrize("router,attn,ngroups", [("soft", "diff2", 1), ("topk", "gqa", 2), ("switch", "diff", 4),
                                                 ("topk", "diff2", 4), ("soft", "gqa", 2)])
def test_graph_decode_equals_eager_token_for_token(router, attn, ngroups):
    # float64, so no rounding can flip an argmax. 5 prompts of different lengths and lengths of output
    # through max_batch 3: rows join and leave, so several buckets are captured and reloaded.
    model = tiny(router, torch.float64, attn_type=attn, ssm_ngroups=ngroups)
    vocab = model.config.vocab_size
    prompts = [torch.randint(4, vocab, (n,)).tolist() for n in (7, 3, 11, 5, 9)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (16, 9, 12, 5, 14)]
    reference = [c.token_ids for c in Engine(model, max_batch=3).generate(prompts, params)]
    fast = [c.token_ids for c in Engine(model, max_batch=3, decoder="fast").generate(prompts, params)]
    engine = Engine(model, max_batch=3, decoder="cuda-graphs", max_context=64)
    graphs = [c.token_ids for c in engine.generate(prompts, params)]
    assert graphs == fast == reference
    assert engine.decoder.replays >= 20 and len(engine.decoder.buckets) >= 2   # graphs did the decoding


@pytest.mark.parametrize("router", ["topk", "switch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_graph_step_logits_match_eager(dtype, tol, router):
    model = tiny(router, dtype)
    vocab = model.config.vocab_size
    logits = {}
    for name in ("eager", "graph"):
        fast = FastDecoder(model)
        decoder = fast if name == "eager" else GraphDecoder(fast, max_context=40, max_batch=4)
        batch = DecodeBatch(model, decoder=decoder)
        torch.manual_seed(3)
        batch.add([Request(torch.randint(4, vocab, (n,)).tolist(),
                           SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), vocab_size=vocab)
                   for n in (6, 2, 9)])
        feed = torch.randint(4, vocab, (6, 3, 1), device="cuda")   # the same tokens for both decoders
        with torch.inference_mode():
            logits[name] = torch.stack([decoder(tokens, batch.cache).float() for tokens in feed])
    assert torch.isfinite(logits["graph"]).all()
    assert rel_error(logits["graph"], logits["eager"]) < tol


def test_seeded_sampling_on_cuda_logits_draws_as_on_the_cpu():
    """A request's generator is on the CPU; CUDA logits are drawn there, so a seed means the same tokens."""
    from mamba_moe.inference.core.sampling import make_generator, sample_token

    params = SamplingParams(temperature=0.8, top_k=50, seed=7)
    logits = torch.randn(512, dtype=torch.float32)
    cpu_gen, gpu_gen = make_generator(7), make_generator(7)
    on_cpu = [sample_token(logits, params, None, cpu_gen) for _ in range(20)]
    on_gpu = [sample_token(logits.cuda(), params, None, gpu_gen) for _ in range(20)]
    assert on_gpu == on_cpu and len(set(on_cpu)) > 1
