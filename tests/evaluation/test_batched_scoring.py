"""Batched scoring (left-padded batches under a mask) against the one-sequence-at-a-time reference, on fresh
random models: soft and top-k routers batch, Switch (capacity counts the batch's tokens) never does.

Tolerance: float64 models agree to 1e-9 nats per sum (measured: ~3e-14) and greedy flags are equal; float32
to 1e-4 nats on sums of ~90-110 nats (measured: ~3e-7; a padded batch changes the SSM's chunking and the
reduction sizes).
"""

from __future__ import annotations

import math
import random

import pytest
from helpers.toy import save_toy_checkpoint

from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.backends.scoring import pair_unit, score_units

WORDS = "the quick brown fox jumps over a lazy dog hello how are you today numbers 42 100 café 東京".split()


def random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def pairs_and_docs():
    rng = random.Random(random.SystemRandom().randrange(2**31))
    pairs = [(random_text(rng, rng.randint(0, 30)), " " + random_text(rng, rng.randint(1, 6))) for _ in range(9)]
    docs = [random_text(rng, rng.randint(1, 90)) for _ in range(5)] + [""]
    return pairs, docs


def backends(path, dtype):
    return (CheckpointBackend(path, dtype=dtype, batch_scoring=True),
            CheckpointBackend(path, dtype=dtype, batch_scoring=False))


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_batched_equals_one_by_one_float64(tmp_path, router, pairs_and_docs, fresh_seed, one_thread):
    # a 64-token context: documents roll over several windows, of different lengths
    path = save_toy_checkpoint(tmp_path, seed=fresh_seed, max_position_embeddings=64, moe_router=router,
                               moe_top_k=2)
    batched, single = backends(path, "float64")
    assert batched._batch_fn is not None and single._batch_fn is None
    pairs, docs = pairs_and_docs
    for a, b in zip(batched.loglikelihood(pairs), single.loglikelihood(pairs), strict=True):
        assert math.isfinite(a.logprob) and a.logprob == pytest.approx(b.logprob, abs=1e-9)
        assert (a.is_greedy, a.tokens) == (b.is_greedy, b.tokens)
    for a, b in zip(batched.rolling_loglikelihood(docs), single.rolling_loglikelihood(docs), strict=True):
        assert math.isfinite(a.nll) and a.nll == pytest.approx(b.nll, abs=1e-9) and a.tokens == b.tokens
    assert max(d.tokens for d in single.rolling_loglikelihood(docs)) > 64   # some document did roll


def test_batch_limits_and_float32(tmp_path, pairs_and_docs, fresh_seed, one_thread):
    path = save_toy_checkpoint(tmp_path, seed=fresh_seed, max_position_embeddings=256)
    batched, single = backends(path, "float32")
    pairs, _ = pairs_and_docs
    units = [pair_unit(single.encode_text, single.prefix_id, 256, c, x) for c, x in pairs]
    reference = score_units(single.logits, units)
    calls = []

    def counted(inputs, keep):
        calls.append(len(inputs))
        assert len(inputs) == 1 or len(inputs) * max(map(len, inputs)) <= max_tokens   # the token budget
        return batched.batch_logits(inputs, keep)

    for max_batch, max_tokens in ((4, 4096), (16, 40), (1, 4096)):
        calls.clear()
        scores = score_units(single.logits, units, counted, max_batch=max_batch, max_tokens=max_tokens)
        assert sum(calls) == len(units) and max(calls) <= max_batch
        for (got, _), (want, _) in zip(scores, reference, strict=True):
            assert math.isfinite(got) and got == pytest.approx(want, abs=1e-4)
        assert max_batch == 1 or max_tokens < 4096 or max(calls) > 1   # batches did form


def test_switch_scores_one_sequence_at_a_time(tmp_path, pairs_and_docs, fresh_seed, one_thread):
    path = save_toy_checkpoint(tmp_path, seed=fresh_seed, moe_router="switch")
    batched, single = backends(path, "float64")
    assert batched._batch_fn is None                      # capacity would make neighbours matter
    pairs, docs = pairs_and_docs
    assert [r.logprob for r in batched.loglikelihood(pairs)] == [r.logprob for r in single.loglikelihood(pairs)]
