"""Logit filters and samplers on small hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_moe.inference.core.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    min_p_filter,
    processed_logits,
    sample_token,
    top_k_filter,
    top_p_filter,
)

INF = math.inf


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    assert top_k_filter(logits, 2).tolist() == [-INF, 3.0, -INF, 3.0, -INF]
    assert top_k_filter(logits, 3).tolist() == [-INF, 3.0, 2.0, 3.0, -INF]
    assert top_k_filter(logits, 1).tolist() == [-INF, 3.0, -INF, 3.0, -INF]  # a tie at the top stays
    assert top_k_filter(logits, 0).tolist() == logits.tolist()                # 0 = off
    assert top_k_filter(logits, 99).tolist() == logits.tolist()


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])          # ranked: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.4)) == [1]          # 0.5 alone reaches 0.4
    assert kept(top_p_filter(logits, 0.7)) == [1, 3]       # 0.5 < 0.7 <= 0.8
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 3]   # 0.8 < 0.85 <= 0.95
    assert kept(top_p_filter(logits, 0.99)) == [0, 1, 2, 3]
    batched = top_p_filter(logits[None].expand(3, 4), 0.7)                  # rows are filtered separately
    assert torch.isfinite(batched).nonzero().tolist() == [[0, 1], [0, 3], [1, 1], [1, 3], [2, 1], [2, 3]]
    kept_logits = top_p_filter(logits, 0.7)
    assert torch.equal(kept_logits[[1, 3]], logits[[1, 3]])   # survivors keep their logits


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert kept(min_p_filter(probs.log(), 0.2)) == [0, 1, 2]   # threshold 0.1
    assert kept(min_p_filter(probs.log(), 0.5)) == [0, 1]      # threshold 0.25
    assert kept(min_p_filter(probs.log(), 1.0)) == [0]
    assert kept(min_p_filter(probs.log(), 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]
    assert apply_repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()
    # The penalty applies to greedy decoding too: 2.0 -> 1.0 loses to the unseen 1.5.
    logits = torch.tensor([2.0, 1.5])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_token(logits, params, torch.tensor([True, False])) == 1
    assert sample_token(logits, params, torch.tensor([False, False])) == 0


def test_order_is_penalty_then_temperature_then_truncation():
    logits = torch.tensor([4.0, 2.0, 1.0, -3.0])
    seen = torch.tensor([True, False, False, True])
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=4.0)
    # penalty: [1, 2, 1, -12]; temperature 0.5: [2, 4, 2, -24]; top-2 keeps the 4 and both 2s (tie).
    assert processed_logits(logits, params, seen).tolist() == [2.0, 4.0, 2.0, -INF]


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_k=2)            # renormalised: 0.625, 0.375
    generator = make_generator(int(torch.randint(0, 2**31, ())))
    n = 4000
    draws = torch.tensor([sample_token(logits, params, generator=generator) for _ in range(n)])
    assert set(draws.tolist()) <= {0, 1}
    share = float((draws == 0).float().mean())
    assert abs(share - 0.625) < 5 * math.sqrt(0.625 * 0.375 / n)


def test_a_seed_fixes_the_draws():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0)
    a = [sample_token(logits, params, generator=g) for g in [make_generator(7)] for _ in range(20)]
    b = [sample_token(logits, params, generator=g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1), ("top_k", -1), ("top_p", 1.5),
                                         ("min_p", 2), ("repetition_penalty", 0), ("temperature", float("nan")),
                                         ("stop", ("",)), ("seed", "x"), ("max_tokens", True)])
def test_bad_parameters_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
