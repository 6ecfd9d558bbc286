"""Helpers shared by the synthetic tasks (passkey, MQAR): seeded randomness and the first number of a reply."""

from __future__ import annotations

import random
import re

_INT_RE = re.compile(r"\d+")


def rng(*parts: object) -> random.Random:
    """A random stream fixed by ``parts`` alone (string seeds are hashed with SHA-512: the same everywhere)."""
    return random.Random("-".join(map(str, parts)))


def first_integer(text: str) -> int | None:
    match = _INT_RE.search(text or "")
    return int(match.group(0)) if match else None
