"""Requests that continue a kept decode state (``Engine.request(cache=..., keep_cache=True)``), against
the same tokens run from scratch. Float64 toy model, so batching and chunking cannot flip an argmax."""

from __future__ import annotations

import pytest
import torch
from helpers import serving

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.inference import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    # module-scoped (before the per-test seed): seeded here, so MAMBA_MOE_TEST_SEED replays the weights too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(serving.TOY_SEED)
        model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", max_position_embeddings=512)).double().eval()
    return Engine(model, prefill_chunk=7)     # several prefill chunks per prompt


def ids(n: int) -> list[int]:
    return torch.randint(4, 500, (n,)).tolist()


def kept_state(engine: Engine, prompt: list[int]):
    """The state after ``prompt`` exactly: a one-token generation whose sampled token is never fed."""
    request = engine.request(prompt, SamplingParams(max_tokens=1, temperature=0), keep_cache=True)
    for _ in engine.run([request]):
        pass
    assert request.final_cache.seen_tokens == len(prompt) and int(request.final_cache.positions[0]) == len(prompt)
    return request.final_cache


def test_continuing_equals_running_the_whole_prompt(engine):
    first, second = ids(int(torch.randint(5, 20, ()))), ids(int(torch.randint(3, 15, ())))
    request = engine.request(second, GREEDY, cache=kept_state(engine, first), keep_cache=True)
    for _ in engine.run([request]):
        pass
    fresh = engine.generate(first + second, GREEDY)
    assert request.completion().token_ids == fresh.token_ids
    # the final state is the whole stream but the last sampled token: its next logits equal a fresh forward
    final, out = request.final_cache, fresh.token_ids
    assert final.seen_tokens == len(first) + len(second) + len(out) - 1
    with torch.inference_mode():   # the kept state is made of inference tensors
        kept = engine.model.decode(torch.tensor([[out[-1]]]), final)[0]
        full = engine.model(torch.tensor([first + second + out])).logits[0, -1]
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-9)


def test_continuing_requests_batch_with_fresh_ones(engine):
    """Continuing rows join a running batch of fresh ones (caches of other lengths, left-padded keys)."""
    pasts = [ids(int(torch.randint(3, 25, ()))) for _ in range(2)]
    news = [ids(int(torch.randint(2, 12, ()))) for _ in range(4)]
    requests = [engine.request(news[0], GREEDY), engine.request(news[1], GREEDY),
                engine.request(news[2], GREEDY, cache=kept_state(engine, pasts[0])),
                engine.request(news[3], GREEDY, cache=kept_state(engine, pasts[1]))]
    for _ in engine.run(requests):
        pass
    expected = [news[0], news[1], pasts[0] + news[2], pasts[1] + news[3]]
    assert [r.completion().token_ids for r in requests] == [engine.generate(p, GREEDY).token_ids for p in expected]


def test_context_limit_counts_the_kept_tokens(engine):
    state = kept_state(engine, ids(500))
    with pytest.raises(ValueError, match="500 already in the cache"):
        engine.request(ids(20), GREEDY, cache=state)
    request = engine.request(ids(5), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), cache=state)
    for _ in engine.run([request]):
        pass
    assert request.completion().finish_reason == "length" and len(request.output_ids) == 512 - 505
