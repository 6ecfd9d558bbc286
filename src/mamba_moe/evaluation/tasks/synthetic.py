"""Helpers shared by the synthetic tasks (passkey, MQAR, needle): seeded randomness and the numbers of a reply."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import EvalError
from ..stats import wilson_interval

_INT_RE = re.compile(r"\d+")


def rng(*parts: object) -> random.Random:
    """A random stream fixed by ``parts`` alone (string seeds are hashed with SHA-512: the same everywhere)."""
    return random.Random("-".join(map(str, parts)))


def first_integer(text: str) -> int | None:
    match = _INT_RE.search(text or "")
    return int(match.group(0)) if match else None


def score_first_integer(targets: Sequence[int], outputs: Sequence[Any]) -> list[dict[str, Any]]:
    """One verdict per output: correct when the reply's first integer is the target (a failed call is wrong)."""
    verdicts = []
    for target, output in zip(targets, outputs, strict=True):
        got = None if output.error else first_integer(output.text)
        verdict = {"score": float(got == target), "correct": got == target, "extracted": got}
        if output.error:
            verdict["error"] = output.error
        verdicts.append(verdict)
    return verdicts


def score_all_integers(targets: Sequence[Sequence[int]], outputs: Sequence[Any]) -> list[dict[str, Any]]:
    """One verdict per output: correct when the reply's first ``len(target)`` integers are the target, in
    order (text around them is ignored; a missing, extra-early or reordered number is wrong, as is a failed
    call). ``hits``: how many positions match, to tell a model that keeps some values from one that keeps none."""
    verdicts = []
    for target, output in zip(targets, outputs, strict=True):
        want = list(target)
        got = [] if output.error else [int(m.group(0)) for m in _INT_RE.finditer(output.text or "")][:len(want)]
        correct = bool(want) and got == want
        hits = sum(g == w for g, w in zip(got, want, strict=False))
        verdict = {"score": float(correct), "correct": correct, "extracted": got, "hits": hits}
        if output.error:
            verdict["error"] = output.error
        verdicts.append(verdict)
    return verdicts


def fit_filler(count: Callable[[str], int], build: Callable[[int], str], budget: int, what: str,
               filler: str, strict: bool = True) -> int:
    """The most ``filler`` sentences ``n`` (found from the measured rate, then trimmed) with
    ``count(build(n)) <= budget``; an error naming ``what`` when even no filler fits (``strict``; else 0, a
    prompt longer than asked, which passkey has always allowed). Shared by the haystack tasks."""
    base = count(build(0))
    if base > budget:
        if not strict:
            return 0
        raise EvalError(f"{what}: {budget} tokens cannot hold the prompt without filler ({base} tokens)")
    per = count(filler * 16) / 16
    n = max(0, int((budget - base) / per))
    while n > 0 and count(build(n)) > budget:
        n = max(0, n - max(1, n // 50))
    return n


def breakdown(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with its Wilson interval, overall, by length and by depth (items are independent draws)."""
    def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        k = sum(bool(r["verdict"]["correct"]) for r in rs)
        return {"value": k / len(rs) if rs else None, "ci95": list(wilson_interval(k, len(rs))), "n": len(rs)}

    by_length: dict[int, list[dict[str, Any]]] = defaultdict(list)
    by_depth: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_length[r["meta"]["length"]].append(r)
        by_depth[r["meta"]["depth"]].append(r)
    result = summary(records)
    result["by_length"] = {str(k): summary(v) for k, v in sorted(by_length.items())}
    result["by_depth"] = {f"{k:g}": summary(v) for k, v in sorted(by_depth.items())}
    return result
