"""Multi-key needle in a haystack: several "secret code" sentences hidden in filler text, one (or all) asked for.

The passkey task hides one number, so a model that remembers only the last number it read passes it.
Here ``needles`` sentences "The secret code for <word> is <number>." sit in the same filler as the
passkey's; the asked needle is placed at the item's depth and the others at seeded random depths, so
the model must tell the keys apart. ``ask=one`` asks for the code of one word (the first number of the
answer must be it; an answer that is another needle's code is counted as a confusion); ``ask=all`` asks
for every code, in a stated order (the first numbers of the answer must be exactly those). Lengths are
prompt tokens in the model's tokenizer (estimated at 4 characters per token without one, and the report
says so); lengths over the backend's context are skipped and listed. Everything is fixed by the seed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..backends.base import Backend, GenRequest
from ..errors import EvalError
from .base import Item, Option, Task, float_list, int_list, positive_int
from .passkey import CHARS_PER_TOKEN, FILLER
from .synthetic import breakdown, fit_filler, rng, score_all_integers, score_first_integer

INTRO = ("There are several secret codes hidden inside a lot of irrelevant text. Find them and memorize "
         "them. I will quiz you about them.\n\n")
NEEDLE = "The secret code for {word} is {code}. "
# Key words: lower-case, no digits, none a part of another, so a key names exactly one needle.
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "harbor", "violet", "candle", "forest", "copper",
         "falcon", "meadow", "piano", "rocket", "silver", "tunnel", "walnut", "garden", "island", "marble",
         "pepper", "saddle", "window")
ASK_MODES = ("one", "all")
TOKENS_PER_CODE = 8   # default max_tokens per asked code (a five-digit number and a separator, with slack)


def ask_mode(text: str) -> str:
    if text not in ASK_MODES:
        raise ValueError(f"expected one of {', '.join(ASK_MODES)}, got {text!r}")
    return text


def make_needles(seed: int, length: int, depth: float, repeat: int, count: int) -> list[tuple[str, int, float]]:
    """``count`` (word, code, depth) needles: distinct words and distinct five-digit codes; the first (the
    one asked for with ``ask=one``) at ``depth``, the others at seeded uniform depths in [0, 1]."""
    r = rng("needle", seed, length, depth, repeat)
    words = r.sample(WORDS, count)
    codes = r.sample(range(10000, 100000), count)
    depths = [depth] + [r.random() for _ in range(count - 1)]
    return list(zip(words, codes, depths, strict=True))


def haystack(n_filler: int, needles: Sequence[tuple[str, int, float]]) -> str:
    """The filler sentence ``n_filler`` times with each needle before filler sentence ``round(depth * n)``
    (several at one place keep their order in ``needles``)."""
    at: dict[int, list[str]] = defaultdict(list)
    for word, code, depth in needles:
        at[round(depth * n_filler)].append(NEEDLE.format(word=word, code=code))
    return "".join("".join(at.get(i, ())) + (FILLER if i < n_filler else "") for i in range(n_filler + 1))


def question(words: Sequence[str], chat: bool) -> str:
    if len(words) == 1:
        ask = f"\n\nWhat is the secret code for {words[0]}?"
        return ask + (" Reply with the number only." if chat else f" The secret code for {words[0]} is")
    listed = ", ".join(words[:-1]) + f" and {words[-1]}"
    ask = f"\n\nWhat are the secret codes for {listed}, in this order?"
    return ask + (" Reply with the numbers only, in this order, separated by spaces." if chat
                  else f" The secret codes for {listed} are")


def build_prompt(n_filler: int, needles: Sequence[tuple[str, int, float]], asked: Sequence[str], chat: bool) -> str:
    return INTRO + haystack(n_filler, needles) + question(asked, chat)


class Needle(Task):
    name = "needle"
    metric = "accuracy"
    OPTIONS = {
        "lengths": Option(int_list, [1024, 2048, 4096, 8192, 16384, 32768], "prompt lengths in tokens"),
        "depths": Option(float_list, [0.0, 0.25, 0.5, 0.75, 1.0], "depths of the asked needle in [0, 1]"),
        "needles": Option(positive_int, 4, f"needles per prompt (at most {len(WORDS)})"),
        "ask": Option(ask_mode, "one", "one: ask for one code; all: ask for every code, in a stated order"),
        "repeats": Option(positive_int, 1, "prompts per (length, depth)"),
        "max_tokens": Option(positive_int, None, f"tokens generated per answer (default {TOKENS_PER_CODE} per "
                                                 "asked code)"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if any(not 0 <= d <= 1 for d in self.options["depths"]):
            raise EvalError(f"--set needle.depths: each depth must lie in [0, 1], got {self.options['depths']}")
        if self.options["needles"] > len(WORDS):
            raise EvalError(f"--set needle.needles: at most {len(WORDS)} (the key words), "
                            f"got {self.options['needles']}")
        if self.options["max_tokens"] is None:
            asked = self.options["needles"] if self.options["ask"] == "all" else 1
            self.options["max_tokens"] = TOKENS_PER_CODE * asked
        self.skipped: list[int] = []
        self.length_unit = "tokens"

    def _count(self, backend: Backend, text: str) -> int:
        counted = backend.count_tokens(text)
        return counted if counted is not None else -(-len(text) // CHARS_PER_TOKEN)

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        if backend.count_tokens("a") is None:
            self.length_unit = f"estimated tokens ({CHARS_PER_TOKEN} characters each)"
        self.skipped = [n for n in self.options["lengths"] if backend.max_context and n > backend.max_context]
        max_tokens = self.options["max_tokens"]
        out = []
        for length in self.options["lengths"]:
            if length in self.skipped:
                continue
            for depth in self.options["depths"]:
                for r in range(self.options["repeats"]):
                    if limit is not None and len(out) >= limit:   # fitting filler costs token counts: stop early
                        return out
                    needles = make_needles(self.seed, length, depth, r, self.options["needles"])
                    asked = [w for w, _, _ in needles] if self.options["ask"] == "all" else [needles[0][0]]
                    codes = [c for _, c, _ in needles]
                    n_filler = fit_filler(lambda text: self._count(backend, text),
                                          lambda n, nd=needles, a=asked: build_prompt(n, nd, a, self.chat),
                                          length - max_tokens, f"--set needle.lengths={length}", FILLER)
                    prompt = build_prompt(n_filler, needles, asked, self.chat)
                    request = (GenRequest(messages=(("user", prompt),), max_tokens=max_tokens) if self.chat
                               else GenRequest(prompt=prompt, max_tokens=max_tokens))
                    target = codes if self.options["ask"] == "all" else codes[0]
                    out.append(Item(f"needle/{length}/{depth:g}/{r}", request, target,
                                    {"length": length, "depth": depth, "filler": n_filler,
                                     "needle_depths": [d for _, _, d in needles], "codes": codes}))
        return out

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.update(skipped_lengths=self.skipped, length_unit=self.length_unit, decoding="greedy")
        return settings

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        if self.options["ask"] == "all":
            return score_all_integers([item.target for item in items], outputs)
        verdicts = score_first_integer([item.target for item in items], outputs)
        for item, verdict in zip(items, verdicts, strict=True):
            # wrong, but with another needle's code: the model found a needle and mixed up the keys
            verdict["confused"] = not verdict["correct"] and verdict["extracted"] in item.meta["codes"][1:]
        return verdicts

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        result = breakdown(records)
        if self.options["ask"] == "one":
            result["confusions"] = sum(bool(r["verdict"].get("confused")) for r in records)
        else:
            result["codes_recalled"] = (sum(r["verdict"]["hits"] for r in records)
                                        / max(1, self.options["needles"] * len(records)))
        return result
