"""The one interface every model form implements, so each task runs unchanged on any of them.

A backend generates (``generate``: plain prompts for base models, message lists for chat) and, where it
can see token probabilities, scores text (``loglikelihood`` for a continuation given a context,
``rolling_loglikelihood`` for a whole document, ``choose`` for the answers an assistant could give a
chat). Tasks ask the capabilities first (``can_score``, ``can_choose``), so a backend that cannot score
(an OpenAI endpoint) is reported as such instead of failing halfway.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EvalError


def message_dicts(messages: tuple[tuple[str, str], ...] | None) -> list[dict[str, str]]:
    """(role, content) pairs as the chat messages encoders take."""
    return [{"role": role, "content": content} for role, content in messages or ()]


@dataclass(frozen=True)
class GenRequest:
    """One generation: ``prompt`` (text, completed as is) or ``messages`` (a chat, answered by the assistant)."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content) pairs; hashable for caching
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenRequest: give exactly one of prompt and messages")

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "stop": list(self.stop),
                               "temperature": self.temperature, "seed": self.seed}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = self.message_dicts()
        return out


@dataclass(frozen=True)
class ChoiceRequest:
    """Which of ``choices`` the assistant would answer a chat with: each choice is scored as the whole answer
    turn (its text, then the end of the turn) after the chat's prompt, as the model was trained to end one."""

    messages: tuple[tuple[str, str], ...]   # (role, content) pairs, as in GenRequest
    choices: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("ChoiceRequest: choices is empty")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"ChoiceRequest: choices repeat: {list(self.choices)}")

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.message_dicts(), "choices": list(self.choices)}


@dataclass
class ChoiceResult:
    """log P(choice's answer turn | the chat) in nats per choice, in the request's order, and its token counts."""

    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    error: str | None = None

    @property
    def best(self) -> int | None:
        """Index of the most likely choice (the first of equals), or None after an error."""
        if self.error or not self.logprobs:
            return None
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)


@dataclass
class GenResult:
    """What came back: the text (stop strings excluded), why it ended, and an error if the backend refused."""

    text: str
    finish_reason: str = "stop"
    error: str | None = None


@dataclass
class Loglikelihood:
    """log P(continuation | context) in nats, whether greedy decoding would produce it, and its token count."""

    logprob: float
    is_greedy: bool
    tokens: int


@dataclass
class RollingScore:
    """Negative log-likelihood (nats) of a whole document and the number of tokens it was scored on."""

    nll: float
    tokens: int
    error: str | None = None


@dataclass
class BackendInfo:
    kind: str                       # checkpoint | hf | gguf | openai
    model: str                      # path or URL + model id
    details: dict[str, Any] = field(default_factory=dict)   # dtype, device, versions, config digest ...


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before the first occurrence of any stop string (backends that ignore ``stop`` agree then)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


class Backend(ABC):
    """A model behind the harness. Subclasses set ``info`` and implement ``generate``; scoring is optional."""

    info: BackendInfo
    can_score: bool = False          # loglikelihood + rolling_loglikelihood implemented
    can_choose: bool = False         # choose implemented (a chat's answers scored in its own chat encoding)
    max_context: int | None = None   # prompt + output tokens, when the backend knows it

    @abstractmethod
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One result per request, in order. Greedy when temperature is 0; ``seed`` makes sampling repeatable."""

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` in this model's tokenizer, or None when the backend cannot tell (then tasks that
        size prompts in tokens estimate from characters, and say so in the report)."""
        return None

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        raise EvalError(f"{self.info.kind} backend: cannot score text (no token probabilities); tasks that need "
                        "log-likelihoods (ppl, lm-eval's multiple choice) need a checkpoint, HF or GGUF model")

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceResult]:
        raise EvalError(f"{self.info.kind} backend: cannot score a chat's answers (no token probabilities, or no "
                        "chat encoding of its own here); choosing among answers needs a checkpoint, HF or GGUF model")

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[RollingScore]:
        raise EvalError(f"{self.info.kind} backend: cannot score text (no token probabilities); the ppl task "
                        "needs a checkpoint, HF or GGUF model")

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the backend holds (a model, a connection pool)."""


# ---- shared token-level scoring (for backends that expose log-probabilities over token ids) ----------------

def rolling_windows(n_tokens: int, max_len: int) -> list[tuple[int, int, int]]:
    """Windows that score every token of a document exactly once, each with as much context as fits.

    The document is ``prefix + tokens``: the target ``tokens[j]`` is predicted from ``seq[: j + 1]``
    (``seq`` has the prefix token first). Targets are cut into consecutive spans of ``max_len``; the span
    ``[s, e)`` is scored with input ``seq[max(0, e - max_len) : e]``, so a later window carries the
    ``max_len - (e - s)`` tokens before it as context (lm-evaluation-harness's rolling scheme with
    context length 1). Returns (input_start, target_start, target_end) in ``seq`` / ``tokens`` indices.
    """
    if max_len < 1:
        raise ValueError(f"max_len: must be >= 1, got {max_len}")
    out = []
    for start in range(0, n_tokens, max_len):
        end = min(start + max_len, n_tokens)
        out.append((max(0, end - max_len), start, end))
    return out


def split_pair(encode: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as tokenized together: the whole string is encoded once and the
    context's tokens split off, so a token spanning the boundary is not cut in two. Spaces at the end of
    the context move to the continuation first (they belong to its first word in BPE vocabularies)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context) if context else []
    if whole[:len(ctx)] != ctx:   # the boundary merged into one token: score the continuation alone
        return ctx, encode(continuation)
    return ctx, whole[len(ctx):]


def check_finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise EvalError(f"{where}: the model produced a non-finite log-probability ({value})")
    return value
