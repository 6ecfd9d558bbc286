"""Passkey retrieval (Mohtashami & Jaggi 2023): a five-digit key hidden in filler text, asked for at the end.

For each length (prompt tokens, in the model's tokenizer) and depth (where the key sits, 0 = start,
1 = end) the haystack is the repeated filler with the needle inserted; the model must produce the key.
A length longer than the backend's context is skipped (listed in the report). Without a tokenizer (an
OpenAI endpoint) lengths are estimated at 4 characters per token, and the report says so. Everything is
fixed by the seed: the keys and the prompts are the same on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backends.base import Backend, GenRequest
from ..errors import EvalError
from .base import Item, Option, Task, float_list, int_list, positive_int
from .synthetic import breakdown, fit_filler, rng, score_first_integer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION_BASE = "\n\nWhat is the pass key? The pass key is"
QUESTION_CHAT = "\n\nWhat is the pass key? Reply with the number only."
CHARS_PER_TOKEN = 4


def build_prompt(n_filler: int, depth: float, key: int, chat: bool) -> str:
    at = round(depth * n_filler)
    haystack = FILLER * at + NEEDLE.format(key=key) + FILLER * (n_filler - at)
    return INTRO + haystack + (QUESTION_CHAT if chat else QUESTION_BASE)


class Passkey(Task):
    name = "passkey"
    metric = "accuracy"
    OPTIONS = {
        "lengths": Option(int_list, [1024, 2048, 4096, 8192, 16384, 32768], "prompt lengths in tokens"),
        "depths": Option(float_list, [0.0, 0.25, 0.5, 0.75, 1.0], "needle depths in [0, 1]"),
        "repeats": Option(positive_int, 1, "keys per (length, depth)"),
        "max_tokens": Option(positive_int, 8, "tokens generated per answer"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if any(not 0 <= d <= 1 for d in self.options["depths"]):
            raise EvalError(f"--set passkey.depths: each depth must lie in [0, 1], got {self.options['depths']}")
        self.skipped: list[int] = []
        self.length_unit = "tokens"

    def _count(self, backend: Backend, text: str) -> int:
        counted = backend.count_tokens(text)
        return counted if counted is not None else -(-len(text) // CHARS_PER_TOKEN)

    def filler_count(self, backend: Backend, length: int) -> int:
        """Filler sentences so that prompt + answer fit in ``length`` tokens (measured, then trimmed)."""
        return fit_filler(lambda text: self._count(backend, text), lambda n: build_prompt(n, 0.5, 99999, self.chat),
                          length - self.options["max_tokens"], f"--set passkey.lengths={length}", FILLER,
                          strict=False)

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        if backend.count_tokens("a") is None:
            self.length_unit = f"estimated tokens ({CHARS_PER_TOKEN} characters each)"
        out = []
        self.skipped = [n for n in self.options["lengths"] if backend.max_context and n > backend.max_context]
        for length in self.options["lengths"]:
            if length in self.skipped:
                continue
            n_filler = self.filler_count(backend, length)
            for depth in self.options["depths"]:
                for r in range(self.options["repeats"]):
                    key = rng("passkey", self.seed, length, depth, r).randint(10000, 99999)
                    prompt = build_prompt(n_filler, depth, key, self.chat)
                    request = (GenRequest(messages=(("user", prompt),), max_tokens=self.options["max_tokens"])
                               if self.chat else GenRequest(prompt=prompt, max_tokens=self.options["max_tokens"]))
                    out.append(Item(f"passkey/{length}/{depth:g}/{r}", request, key,
                                    {"length": length, "depth": depth, "filler": n_filler}))
        return out[:limit]

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.update(skipped_lengths=self.skipped, length_unit=self.length_unit, decoding="greedy")
        return settings

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        return score_first_integer([item.target for item in items], outputs)

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return breakdown(records)
