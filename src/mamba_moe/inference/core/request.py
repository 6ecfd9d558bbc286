"""One generation request while it runs: its sampler state, its text so far, and when it is done."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .sampling import SamplingParams, make_generator, sample_token
from .text import IncrementalDecoder, StopMatcher

_ids = itertools.count()


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before
    temperature and the other sampling filters) and the ``k`` most likely tokens at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StreamEvent:
    """What one decode step produced for one request: a text delta and the new token ids.

    ``finish_reason`` is set on the request's last event: "stop" (an end token or a stop string),
    "length" (max_tokens or the context limit) or "abort" (cancelled).
    """

    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None   # one per token id, when the request asked for them


@dataclass
class Completion:
    """A finished request: the generated text (stop strings and end tokens excluded) and token ids."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Request:
    """A prompt and its sampling parameters, plus the running state of its generation.

    ``stop_ids`` are the end tokens (the tokenizer's end-of-text and end-of-turn, plus the request's own
    ``stop_token_ids``); ``max_length`` caps prompt + output (the model's context).

    ``start_cache``: a one-row ``HybridCache`` that already holds ``past_tokens`` tokens (a chat's earlier
    turns, ``memory/working.py``); the prompt is then only the new tokens, fed on top of it (the cache is
    advanced in place: pass a clone to keep it). ``keep_cache``: when the request finishes, ``final_cache``
    is its own one-row decode state: everything fed, i.e. the past, the prompt and the output except its
    last token (sampled, never fed).
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    tokenizer: Any = None
    vocab_size: int = 0
    max_length: int | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    start_cache: Any = field(default=None, repr=False)
    past_tokens: int = 0
    keep_cache: bool = False

    def __post_init__(self) -> None:
        self.final_cache: Any = None
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.generator = None if self.params.greedy else make_generator(self.params.seed)
        self.decoder = IncrementalDecoder(self.tokenizer, self.prompt_ids) if self.tokenizer is not None else None
        self.stops = StopMatcher(self.params.stop)
        self.seen: Tensor | None = None
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(self.prompt_ids, dtype=torch.long)] = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_sampler(self) -> bool:
        """False when plain argmax picks this request's token (batched in one op for such rows)."""
        return not self.params.greedy or self.seen is not None

    @property
    def remaining(self) -> int:
        """Tokens this request may still generate: max_tokens, capped by the context."""
        left = self.params.max_tokens - len(self.output_ids)
        if self.max_length is not None:
            left = min(left, self.max_length - self.past_tokens - len(self.prompt_ids) - len(self.output_ids))
        return max(left, 0)

    def choose(self, logits: Tensor) -> int:
        """The next token from this request's row of logits (V,)."""
        seen = None if self.seen is None else self.seen.to(logits.device)
        return sample_token(logits, self.params, seen, self.generator)

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> StreamEvent:
        """Record a generated token; return the text it completes and whether the request is finished."""
        self.output_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        event = self._accept(token)
        if self.logprobs is not None and logprob is not None:
            event.logprobs = [logprob]
        return event

    def _accept(self, token: int) -> StreamEvent:
        if self.seen is not None:
            self.seen[token] = True
        if token in self.stop_ids:
            return self._finish("stop", [token])
        delta = self.stops.add(self.decoder.push(token)) if self.decoder is not None else ""
        if self.stops.stopped:
            return self._finish("stop", [token], delta)
        total = self.past_tokens + len(self.prompt_ids) + len(self.output_ids)
        if len(self.output_ids) >= self.params.max_tokens or (self.max_length is not None
                                                               and total >= self.max_length):
            return self._finish("length", [token], delta)
        self.text += delta
        return StreamEvent(self.request_id, delta, [token])

    def cancel(self) -> StreamEvent:
        """Stop this request where it is (the client went away); its held-back text is released."""
        return self._finish("abort", [])

    def _finish(self, reason: str, tokens: list[int], delta: str = "") -> StreamEvent:
        if self.decoder is not None and not self.stops.stopped:
            delta += self.stops.add(self.decoder.flush())
        if not self.stops.stopped:
            delta += self.stops.finish()
        self.text += delta
        self.finish_reason = reason
        return StreamEvent(self.request_id, delta, tokens, reason)

    def completion(self) -> Completion:
        if self.finish_reason is None:
            raise RuntimeError(f"request {self.request_id}: still running")
        return Completion(self.text, list(self.output_ids), self.finish_reason, len(self.prompt_ids),
                          None if self.logprobs is None else list(self.logprobs))
