"""What trainers ask of the model: chunked LM loss without logits, activation checkpointing, domain routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_error

from mamba_moe.config import get_preset
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.ops.cross_entropy import lm_cross_entropy, lm_cross_entropy_reference
from mamba_moe.ops.moe import domain_routing_loss


def tiny(**overrides) -> MambaMoEForCausalLM:
    cfg = get_preset("mamba-moe-tiny", **overrides)
    return MambaMoEForCausalLM(cfg).double()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_reference_with_gradients(chunk):
    n, d, v = 50, 16, 33
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::5] = -100

    def head(h):
        return F.linear(h, weight)

    ref = lm_cross_entropy_reference(hidden, head, targets)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = lm_cross_entropy(hidden, head, targets, chunk_size=chunk)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert torch.isfinite(got)
    assert rel_error(got, ref) < 1e-12
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-12


def test_chunked_cross_entropy_rejects_misshaped_targets():
    with pytest.raises(ValueError, match="targets"):
        lm_cross_entropy(torch.randn(4, 3), lambda h: h, torch.zeros(5, dtype=torch.long))


def test_loss_without_logits_equals_loss_from_logits_and_labels():
    model = tiny()
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[1, 8:] = -100  # aligned targets are the caller's: the last real token has no next token
    full = model(ids, attention_mask=mask, targets=targets)
    chunked = model(ids, attention_mask=mask, targets=targets, return_logits=False)
    via_labels = model(ids, attention_mask=mask, labels=ids)
    assert chunked.logits is None and full.logits is not None
    assert rel_error(chunked.loss, full.loss) < 1e-12
    assert rel_error(via_labels.loss, full.loss) < 1e-12
    # By hand: only real positions that have a real next token count.
    logp = torch.log_softmax(full.logits, -1)
    terms = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(11) if mask[b, t + 1]]
    assert rel_error(full.loss, torch.stack(terms).mean()) < 1e-12


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny()
    ids = torch.randint(4, model.config.vocab_size, (2, 16))
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    assert rel_error(loss1, loss0) < 1e-12
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert rel_error(g1, g0) < 1e-10


def test_domain_routing_loss_by_hand_and_ignored_tokens():
    logits = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, -1, 2, -1, 1])
    valid = torch.tensor([True, True, True, True, True, False])
    got = domain_routing_loss(logits, targets, valid)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0] + logp[1, 3] + logp[3, 2]) / 3
    assert rel_error(got, expected) < 1e-12
    assert float(domain_routing_loss(logits, torch.full((6,), -1))) == 0.0


def test_model_reports_domain_loss_and_it_pulls_the_router_toward_the_target():
    model = tiny(moe_router="soft")
    ids = torch.randint(4, model.config.vocab_size, (2, 10))
    expert = 1
    routers = [m.router.weight for m in model.modules() if hasattr(m, "router")]
    out = model(ids, expert_targets=torch.full((2, 10), expert))
    losses = [s.domain_loss for s in out.router_stats]
    assert len(losses) == len(routers) and all(torch.isfinite(x) for x in losses)
    grads = torch.autograd.grad(sum(losses), routers)
    assert all(g.abs().sum() > 0 for g in grads)
    # One small step along -grad raises the target expert's mean router probability in every layer.
    with torch.no_grad():
        before = [s.domain_loss for s in model(ids, expert_targets=torch.full((2, 10), expert)).router_stats]
        for w, g in zip(routers, grads, strict=True):
            w -= 1e-2 * g
        after = [s.domain_loss for s in model(ids, expert_targets=torch.full((2, 10), expert)).router_stats]
    assert all(a < b for a, b in zip(after, before, strict=True))
    assert model(ids).router_stats[0].domain_loss is None


def test_expert_targets_out_of_range_is_a_clear_error():
    model = tiny()
    ids = torch.randint(4, model.config.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="expert_targets"):
        model(ids, expert_targets=torch.full((1, 5), model.config.moe_num_experts))
    with pytest.raises(ValueError, match="expert_targets"):
        model(ids, expert_targets=torch.zeros(1, 4, dtype=torch.long))
