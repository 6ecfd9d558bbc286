"""Parameter groups (no decay where decay hurts) and the learning-rate schedules."""

from __future__ import annotations

import random

import pytest
import torch

from mamba_moe.config import get_preset
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.training import build_optimizer, lr_at, param_groups


def test_param_groups() -> None:
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny"))
    decay, keep = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for name, p in model.named_parameters():
        flagged = getattr(p, "_no_weight_decay", False)
        if flagged or p.dim() < 2 or "norm" in name or "embed" in name:
            assert id(p) not in decay_ids, name
    decayed = [names[i] for i in decay_ids]
    assert any("in_proj" in n for n in decayed) and any("out_proj" in n for n in decayed)
    assert not any(n.endswith(("A_log", "D", "dt_bias")) for n in decayed)
    total = sum(p.numel() for g in (decay, keep) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_shape(schedule) -> None:
    lr, min_lr = random.uniform(1e-4, 1e-2), 1e-5
    warmup, total = random.randint(1, 20), random.randint(50, 200)
    rates = [lr_at(s, lr=lr, min_lr=min_lr, warmup=warmup, max_steps=total, schedule=schedule) for s in range(total)]
    assert rates[0] == pytest.approx(lr / warmup)
    assert rates[warmup - 1] == pytest.approx(lr)
    assert all(a <= b + 1e-15 for a, b in zip(rates[:warmup], rates[1:warmup], strict=False))
    after = rates[warmup:]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:], strict=False))  # never rises after warmup
    assert rates[-1] == pytest.approx(min_lr, abs=lr * 1e-3) or rates[-1] <= rates[warmup]
    assert lr_at(total, lr=lr, min_lr=min_lr, warmup=warmup, max_steps=total, schedule=schedule) == min_lr
    if schedule == "wsd":
        assert rates[int(total * 0.7)] == lr  # the stable phase
