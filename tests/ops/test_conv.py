"""Causal depthwise conv: one pass == token steps == pieces with state; the state after right padding."""

from __future__ import annotations

import torch
from helpers.numerics import rel_error

from mamba_moe.ops.conv import causal_conv1d, causal_conv1d_step, conv_state_at


def direct_conv(x, weight, bias):
    """y_t = bias + sum_k w_k x_{t-K+1+k}, written as loops."""
    b, l, c = x.shape
    K = weight.shape[1]
    y = torch.zeros_like(x)
    for t in range(l):
        for k in range(K):
            src = t - K + 1 + k
            if src >= 0:
                y[:, t] += weight[:, k] * x[:, src]
    return y + bias


def test_conv_matches_direct_sum_steps_and_pieces():
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    y, state = causal_conv1d(x, w, bias)
    assert rel_error(y, direct_conv(x, w, bias)) < 1e-12

    s = torch.zeros(2, 6, 3, dtype=torch.float64)
    steps = []
    for t in range(13):
        y_t, s = causal_conv1d_step(x[:, t], s, w, bias)
        steps.append(y_t)
    assert rel_error(torch.stack(steps, 1), y) < 1e-12 and torch.equal(s, state)

    y1, s1 = causal_conv1d(x[:, :5], w, bias)
    y2, s2 = causal_conv1d(x[:, 5:], w, bias, s1)
    assert rel_error(torch.cat([y1, y2], 1), y) < 1e-12 and torch.equal(s2, state)


def test_conv_state_at_last_real_token():
    x = torch.randn(3, 9, 5)
    init = torch.randn(3, 5, 2)
    last = torch.tensor([8, 3, -1])
    got = conv_state_at(x, init, last, 3)
    _, full = causal_conv1d(x, torch.randn(5, 3), None, init)
    assert torch.equal(got[0], full[0])
    _, upto3 = causal_conv1d(x[:, :4], torch.randn(5, 3), None, init)
    assert torch.equal(got[1], upto3[1])
    assert torch.equal(got[2], init[2])  # no real token: the state is untouched
