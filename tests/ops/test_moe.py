"""MoE routing: Switch capacity by hand, uniform-routing loss, router gradients, exact soft mixture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_error

from mamba_moe.config import get_preset
from mamba_moe.model.ffn import MoEFeedForward
from mamba_moe.ops.moe import load_balancing_loss, route, switch_capacity


def test_switch_capacity_formula():
    assert switch_capacity(100, 8, 1.25, 4) == math.ceil(1.25 * 100 / 8)
    assert switch_capacity(10, 8, 1.0, 4) == 4  # the minimum capacity wins


def test_switch_dropping_matches_hand_computation():
    # 10 tokens, 3 experts, capacity = max(2, ceil(0.5 * 10 / 3)) = 2.
    choice = torch.tensor([0, 0, 1, 0, 2, 0, 1, 1, 1, 2])
    logits = F.one_hot(choice, 3).float() * 5 + torch.randn(10, 3) * 0.01
    r = route(logits, "switch", 1, capacity_factor=0.5, min_capacity=2)
    # In token order, expert 0 keeps tokens 0, 1 (drops 3, 5); expert 1 keeps 2, 6 (drops 7, 8);
    # expert 2 keeps 4, 9.
    assert r.dropped.tolist() == [False, False, False, True, False, True, False, True, True, False]
    kept = (r.weights > 0).sum(0).tolist()
    assert kept == [2, 2, 2]
    probs = torch.softmax(logits, -1)
    for t in range(10):  # kept tokens are weighted by their raw top-1 probability
        expected = 0.0 if r.dropped[t] else probs[t, choice[t]].item()
        assert r.weights[t, choice[t]].item() == pytest.approx(expected)


def test_switch_padding_takes_no_capacity():
    choice = torch.tensor([0, 0, 0, 0])
    logits = F.one_hot(choice, 2).float() * 5
    valid = torch.tensor([False, False, True, True])
    r = route(logits, "switch", 1, valid, capacity_factor=1.0, min_capacity=1)
    # 2 real tokens -> capacity ceil(2 / 2) = 1: token 2 kept, token 3 dropped; padding neither.
    assert r.dropped.tolist() == [False, False, False, True]
    assert (r.weights[:2] == 0).all() and r.weights[2, 0] > 0


def test_topk_renormalises_over_selected():
    logits = torch.randn(6, 5)
    r = route(logits, "topk", 2)
    assert torch.allclose(r.weights.sum(-1), torch.ones(6))
    assert ((r.weights > 0).sum(-1) == 2).all()
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    assert torch.allclose(r.weights.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_balance_loss_is_one_for_uniform_routing(router):
    E = 4
    logits = torch.zeros(16, E)  # uniform probabilities
    r = route(logits, router, 2, capacity_factor=10.0)
    assert load_balancing_loss(logits, r.assigned).item() == pytest.approx(1.0)
    # Perfectly balanced assignments with uniform probabilities: also 1.0.
    assigned = F.one_hot(torch.arange(16) % E, E).bool()
    assert load_balancing_loss(logits, assigned).item() == pytest.approx(1.0)


def moe_layer(router, **overrides):
    settings = {"moe_router": router, "moe_top_k": 2, "moe_capacity_factor": 2.0, **overrides}
    config = get_preset("mamba-moe-tiny", **settings)
    return MoEFeedForward(config)


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_router_receives_gradient(router):
    layer = moe_layer(router)
    x = torch.randn(2, 9, 64)
    out, aux, _ = layer(x)
    # Through the outputs alone (not only the aux loss) the router must learn.
    out.pow(2).sum().backward(retain_graph=True)
    g_out = layer.router.weight.grad.clone()
    assert g_out.abs().sum() > 0 and torch.isfinite(g_out).all()
    layer.zero_grad()
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_soft_router_is_exact_weighted_sum_of_experts():
    layer = moe_layer("soft")
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    layer = layer.double()
    out, _, _ = layer(x)
    tokens = x.reshape(-1, 64)
    probs = torch.softmax(tokens @ layer.router.weight.T, -1)
    expected = sum(probs[:, e:e + 1] * layer.experts.expert(e, tokens) for e in range(layer.num_experts))
    expected = expected + layer.shared_expert(tokens)
    assert rel_error(out.reshape(-1, 64), expected) < 1e-12


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_sparse_dispatch_equals_dense_weighted_sum(router):
    layer = moe_layer(router).double()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    out, _, stats = layer(x)
    tokens = x.transpose(0, 1).reshape(-1, 64)  # the layer's position-major token order
    r = route(tokens @ layer.router.weight.T, router, layer.top_k, capacity_factor=2.0,
              min_capacity=layer.min_capacity)
    dense = torch.stack([layer.experts.expert(e, tokens) for e in range(layer.num_experts)], 1)
    expected = (dense * r.weights[..., None].double()).sum(1) + layer.shared_expert(tokens)
    assert rel_error(out.transpose(0, 1).reshape(-1, 64), expected) < 1e-12
    assert int(stats.tokens_per_expert.sum()) == int((r.weights > 0).sum())


def test_padding_tokens_are_not_routed_and_do_not_change_others():
    layer = moe_layer("switch", moe_min_capacity=0, moe_capacity_factor=1.0)
    x = torch.randn(1, 8, 64)
    mask = torch.tensor([[False, False, True, True, True, True, True, True]])
    out, aux, stats = layer(x, mask)
    x2 = x.clone()
    x2[:, :2] = torch.randn(1, 2, 64) * 10
    out2, aux2, _ = layer(x2, mask)
    assert torch.equal(out[:, 2:], out2[:, 2:]) and torch.equal(aux, aux2)
    assert int(stats.tokens_per_expert.sum()) + int(stats.dropped_tokens) == 6
