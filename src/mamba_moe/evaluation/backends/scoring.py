"""Token-level scoring for backends that give logits over ids (our checkpoints, HF models, GGUF via llama.cpp).

A scoring *unit* is a token list and how many of its last tokens to score: the model reads
``tokens[:-1]`` and the log-probability of each of the last ``n`` tokens is summed. Continuations
given a context and windows of a long document (``base.rolling_windows``) both become units, so the
lm-eval adapter and the ``ppl`` task share one code path. Units run one at a time: batching with
padding would change nothing for per-token routers but would for capacity-limited ones, and exact
numbers matter more here than speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import EvalError
from .base import Loglikelihood, RollingScore, check_finite, rolling_windows, split_pair

LogitsFn = Callable[[list[int]], torch.Tensor]   # ids (l,) -> logits (l, V) of the next token at each position


def score_unit(logits_fn: LogitsFn, tokens: Sequence[int], n: int) -> tuple[float, bool]:
    """(sum of log P(token) over the last ``n`` tokens, whether each is the argmax) with ``tokens[:-1]`` as input."""
    if not 1 <= n < len(tokens):
        raise ValueError(f"score_unit: need 1 <= n < {len(tokens)} tokens, got n={n}")
    logits = logits_fn(list(tokens[:-1]))[-n:].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[-n:], dtype=torch.long)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0]
    greedy = bool((logprobs.argmax(-1) == targets).all())
    return float(chosen.sum()), greedy


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
                   pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
    out = []
    for context, continuation in pairs:
        tokens, n = pair_unit(encode, prefix_id, max_len, context, continuation)
        logprob, greedy = score_unit(logits_fn, tokens, n)
        out.append(Loglikelihood(check_finite(logprob, "loglikelihood"), greedy, n))
    return out


def rolling(logits_fn: LogitsFn, encode: Callable[[str], list[int]], prefix_id: int, max_len: int,
            texts: Sequence[str]) -> list[RollingScore]:
    out = []
    for text in texts:
        ids = encode(text)
        if not ids:
            out.append(RollingScore(0.0, 0))
            continue
        seq = [prefix_id] + ids
        nll = 0.0
        for in_start, start, end in rolling_windows(len(ids), max_len):
            logprob, _ = score_unit(logits_fn, seq[in_start:end + 1], end - start)
            nll -= logprob
        out.append(RollingScore(check_finite(nll, "rolling loglikelihood"), len(ids)))
    return out
