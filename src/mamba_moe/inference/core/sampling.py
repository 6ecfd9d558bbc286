"""Choosing the next token: sampling parameters and the logit filters, as pure functions.

Order of application (the order of HF transformers' warpers): repetition penalty on the raw logits,
then temperature, then top-k, top-p and min-p on the tempered distribution. Temperature 0 is greedy
(argmax after the repetition penalty; the other filters cannot change an argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_LOGPROBS = 20   # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Defaults follow the OpenAI API (temperature 1, no truncation)."""

    max_tokens: int = 256
    temperature: float = 1.0            # 0 = greedy
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # 1 = off
    min_p: float = 0.0                  # 0 = off
    repetition_penalty: float = 1.0     # 1 = off; > 1 discourages tokens already in prompt or output
    stop: tuple[str, ...] = ()          # stop strings, matched on the decoded text (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the tokenizer's end tokens
    seed: int | None = None             # None = a fresh random seed per request
    ignore_eos: bool = False            # keep going past end tokens (benchmarks)
    logprobs: int | None = None         # None = off; k >= 0: each token's log-probability + the k most likely

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg} (got {getattr(self, name)!r})")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                fail(name, "must be a finite number")
            return float(value)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail("max_tokens", "must be a positive integer")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be a non-negative integer (0 = off)")
        if number("temperature") < 0:
            fail("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < number("top_p") <= 1:
            fail("top_p", "must be in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            fail("min_p", "must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            fail("repetition_penalty", "must be > 0 (1 = off)")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail("seed", "must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' logits divided by ``penalty`` if > 0, else times it.

    logits (..., V); seen (..., V) bool marks tokens in the prompt or the output so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties with the k-th are kept too); the rest become -inf. k = 0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most probable tokens until their mass reaches p.

    A token is kept when the mass of the tokens ranked above it is < p, so the most probable token is
    always kept and the kept mass is the smallest that is >= p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below min_p times the top probability."""
    if min_p <= 0.0:
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def processed_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """The logits a token is drawn from: penalty, temperature and the truncation filters applied."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample_token(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                 generator: torch.Generator | None = None) -> int:
    """Draw one token id from a single row of logits (V,)."""
    logits = processed_logits(logits, params, seen)
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and probs.device != generator.device:
        # A request's generator lives on the CPU (multinomial refuses one on another device): drawing there
        # also makes a seed give the same tokens on any device, for the same probabilities.
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random stream for one request: seeded if asked, otherwise from fresh OS entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


__all__ = ["SamplingParams", "apply_repetition_penalty", "make_generator", "min_p_filter", "processed_logits",
           "sample_token", "top_k_filter", "top_p_filter"]
