"""Token-level scoring for backends that give logits over ids (our checkpoints, HF models, GGUF via llama.cpp).

A scoring *unit* is a token list and how many of its last tokens to score: the model reads
``tokens[:-1]`` and the log-probability of each of the last ``n`` tokens is summed. Continuations
given a context and windows of a long document (``base.rolling_windows``) both become units, so the
lm-eval adapter and the ``ppl`` task share one code path.

Units run one at a time (``logits_fn``, the reference), or in batches when the backend gives a
``batch_logits_fn``: units sorted by length, left-padded with a mask, at most ``max_batch`` rows and
``max_tokens`` padded tokens a batch, and only the last ``max(n)`` positions' logits computed. A
backend offers batching only where padding cannot change a number: for per-token routers, not for
Switch, whose expert capacity counts every token of the batch. Batched and one-by-one scores agree to
rounding (``tests/evaluation/test_batched_scoring.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import EvalError
from .base import ChoiceRequest, ChoiceResult, Loglikelihood, RollingScore, check_finite, rolling_windows, split_pair

LogitsFn = Callable[[list[int]], torch.Tensor]   # ids (l,) -> logits (l, V) of the next token at each position
# id lists (one model input each) and k -> logits (b, k, V) of the last k positions of each input
BatchLogitsFn = Callable[[list[list[int]], int], torch.Tensor]
MAX_BATCH = 16
MAX_TOKENS = 4096   # padded tokens per batch: bounds the (b, k, V) logits too (V = 32k: 0.5 GB in float32)


def _score_logits(logits: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """(sum of log P(target), all targets the argmax) from logits (n, V) predicting ``targets`` (n,)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long)
    chosen = logprobs.gather(-1, index[:, None])[:, 0]
    return float(chosen.sum()), bool((logprobs.argmax(-1) == index).all())


def _check_unit(tokens: Sequence[int], n: int) -> None:
    if not 1 <= n < len(tokens):
        raise ValueError(f"score_unit: need 1 <= n < {len(tokens)} tokens, got n={n}")


def score_unit(logits_fn: LogitsFn, tokens: Sequence[int], n: int) -> tuple[float, bool]:
    """(sum of log P(token) over the last ``n`` tokens, whether each is the argmax) with ``tokens[:-1]`` as input."""
    _check_unit(tokens, n)
    return _score_logits(logits_fn(list(tokens[:-1]))[-n:], tokens[-n:])


def score_units(logits_fn: LogitsFn, units: Sequence[tuple[Sequence[int], int]],
                batch_logits_fn: BatchLogitsFn | None = None, max_batch: int = MAX_BATCH,
                max_tokens: int = MAX_TOKENS) -> list[tuple[float, bool]]:
    """``score_unit`` of every (tokens, n), in order: one at a time, or batched through ``batch_logits_fn``."""
    for tokens, n in units:
        _check_unit(tokens, n)
    if batch_logits_fn is None:
        return [score_unit(logits_fn, tokens, n) for tokens, n in units]
    order = sorted(range(len(units)), key=lambda i: -len(units[i][0]))   # longest first: little padding
    results: list[tuple[float, bool] | None] = [None] * len(units)
    start = 0
    while start < len(order):
        longest = len(units[order[start]][0]) - 1
        end = start + 1
        while end < len(order) and end - start < max_batch and (end - start + 1) * longest <= max_tokens:
            end += 1
        group = order[start:end]
        keep = max(units[i][1] for i in group)
        logits = batch_logits_fn([list(units[i][0][:-1]) for i in group], keep)
        for row, i in enumerate(group):
            tokens, n = units[i]
            results[i] = _score_logits(logits[row, keep - n:], tokens[-n:])
        start = end
    return results  # type: ignore[return-value]


def pair_unit(encode: Callable[[str], list[int]], prefix_id: int, max_len: int, context: str,
              continuation: str) -> tuple[list[int], int]:
    """The unit of log P(continuation | context): an empty context is the prefix token (EOS/BOS) alone;
    longer than ``max_len`` + 1 tokens, the context is cut on the left (the continuation never)."""
    ctx, cont = split_pair(encode, context, continuation)
    if not cont:
        raise EvalError(f"loglikelihood: the continuation {continuation!r} has no tokens")
    if len(cont) > max_len:
        raise EvalError(f"loglikelihood: the continuation is {len(cont)} tokens, more than the model's context "
                        f"of {max_len}")
    full = (ctx or [prefix_id]) + cont
    return full[-(max_len + 1):], len(cont)


def loglikelihoods(logits_fn: LogitsFn, encode: Callable[[str], list[int]], prefix_id: int, max_len: int,
                   pairs: Sequence[tuple[str, str]],
                   batch_logits_fn: BatchLogitsFn | None = None) -> list[Loglikelihood]:
    units = [pair_unit(encode, prefix_id, max_len, context, continuation) for context, continuation in pairs]
    scores = score_units(logits_fn, units, batch_logits_fn)
    return [Loglikelihood(check_finite(logprob, "loglikelihood"), greedy, n)
            for (logprob, greedy), (_, n) in zip(scores, units, strict=True)]


def rolling(logits_fn: LogitsFn, encode: Callable[[str], list[int]], prefix_id: int, max_len: int,
            texts: Sequence[str], batch_logits_fn: BatchLogitsFn | None = None) -> list[RollingScore]:
    units, owner, lengths = [], [], []
    for index, text in enumerate(texts):
        ids = encode(text)
        lengths.append(len(ids))
        seq = [prefix_id] + ids
        for in_start, start, end in rolling_windows(len(ids), max_len):
            units.append((seq[in_start:end + 1], end - start))
            owner.append(index)
    nll = [0.0] * len(texts)
    for index, (logprob, _) in zip(owner, score_units(logits_fn, units, batch_logits_fn), strict=True):
        nll[index] -= logprob
    return [RollingScore(check_finite(value, "rolling loglikelihood") if tokens else 0.0, tokens)
            for value, tokens in zip(nll, lengths, strict=True)]


def choices(logits_fn: LogitsFn, prompt_ids: Callable[[ChoiceRequest], list[int]],
            answer_ids: Callable[[str], list[int]], max_len: int, requests: Sequence[ChoiceRequest],
            batch_logits_fn: BatchLogitsFn | None = None) -> list[ChoiceResult]:
    """``Backend.choose`` for a backend that gives logits: each choice's answer ids (``answer_ids``: its text and
    the end of the turn, in the backend's chat encoding) scored after the request's chat prompt (``prompt_ids``),
    all requests' units batched together. A prompt and answer longer than ``max_len`` is an error of that
    request, never cut: a chat's opening (a reader's facts) is what it is about."""
    results: list[ChoiceResult | None] = [None] * len(requests)
    units: list[tuple[list[int], int]] = []
    owner: list[tuple[int, list[int]]] = []
    for i, request in enumerate(requests):
        prompt = prompt_ids(request)
        answers = [answer_ids(choice) for choice in request.choices]
        longest = len(prompt) + max(map(len, answers)) - 1    # the model reads all but the last answer token
        if longest > max_len:
            results[i] = ChoiceResult((), (), f"prompt and answer: {longest} tokens to read (the last answer token "
                                              f"is only predicted), the context holds {max_len}")
            continue
        units += [(prompt + answer, len(answer)) for answer in answers]
        owner.append((i, [len(answer) for answer in answers]))
    scores = iter(score_units(logits_fn, units, batch_logits_fn))
    for i, lengths in owner:
        logprobs = tuple(check_finite(next(scores)[0], "choose") for _ in lengths)
        results[i] = ChoiceResult(logprobs, tuple(lengths))
    return results  # type: ignore[return-value]
