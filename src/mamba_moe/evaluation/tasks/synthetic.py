"""Helpers shared by the synthetic tasks (passkey, MQAR): seeded randomness and the first number of a reply."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

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
