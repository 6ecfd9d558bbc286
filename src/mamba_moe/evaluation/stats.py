"""Intervals and estimators for the report: every number comes with n and a 95% interval.

- A proportion of independent yes/no outcomes (GSM8K exact match, greedy pass@1, passkey hits):
  the Wilson score interval, which stays inside [0, 1] and is honest at 0/n and n/n (the normal
  approximation claims [0, 0] for 0 of 5).
- Anything else (a mean of per-problem pass@k estimates, bits per byte over documents, recall over
  queries that share a context): the percentile bootstrap over the independent units (problems,
  documents, contexts), with a fixed seed so a report is reproducible.
- pass@k: the unbiased estimator of Chen et al. 2021 (1 - C(n-c, k) / C(n, k)), as a stable product.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

Z95 = 1.959963984540054   # the 97.5% quantile of the standard normal
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (0, 1) when n is 0 (nothing is known)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes: expected 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(units: Sequence, statistic: Callable[[Sequence], float],
                       resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | tuple[None, None]:
    """Percentile-bootstrap 95% interval of ``statistic`` over resamples (with replacement) of ``units``;
    (None, None) with fewer than two units, where resampling knows nothing of the spread."""
    if len(units) < 2:
        return None, None
    rng = random.Random(seed)
    n = len(units)
    values = sorted(statistic([units[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    return values[int(0.025 * (resamples - 1))], values[int(math.ceil(0.975 * (resamples - 1)))]


def clustered_interval(units: Sequence, statistic: Callable[[Sequence], float],
                       value: float) -> tuple[float, float] | tuple[None, None]:
    """95% interval of a proportion whose outcomes come in correlated clusters (queries of one context,
    samples of one problem): the bootstrap over clusters, widened to at least the Wilson interval that
    counts each cluster as one observation. The bootstrap alone claims [0, 0] when every cluster scores 0;
    the widening keeps 0 of 5 contexts at [0, 0.43], as 0 of 5 independent outcomes would be."""
    lo, hi = bootstrap_interval(units, statistic)
    if lo is None or hi is None:
        return None, None
    w_lo, w_hi = wilson_interval(round(value * len(units)), len(units))
    return min(lo, w_lo), max(hi, w_hi)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
