"""Numerical comparison helpers for tests."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; NaN anywhere counts as infinitely wrong."""
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    scale = expected.detach().abs().max().clamp(min=1e-30)
    return float((actual - expected).detach().abs().max() / scale)


def greedy_margin(reference, request) -> float:
    """The smallest top-two logit gap along the greedy answer ``reference`` (a ``CheckpointBackend``) gives to
    ``request`` (a ``GenRequest``: its prompt ids, limit and stops): the prompt's last step and every answer
    step. Below a tolerance (float32 vs float64: ~1e-6), a second implementation may legitimately pick the
    other token."""
    from mamba_moe.inference import SamplingParams

    ids = reference._prompt_ids(request)
    params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, stop=request.stop)
    answer = reference.engine.generate([ids], [params])[0].token_ids
    top2 = torch.topk(reference.logits(ids + answer)[len(ids) - 1:], 2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())
