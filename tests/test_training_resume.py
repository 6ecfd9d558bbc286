"""Checkpoints: complete inference directories, atomic, pruned; exact resume; clean stop on NaN."""

from __future__ import annotations

import json

import pytest
import torch
from test_training_common import tiny_config

from mamba_moe.data import load_tokenizer
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.training import Trainer, TrainingDiverged, list_checkpoints


def _metric_losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_is_bitwise_exact(corpus, tmp_path, fresh_seed) -> None:
    n = 3
    seed = fresh_seed % 10_000
    straight = tiny_config(corpus, tmp_path / "straight", max_steps=2 * n, seed=seed, grad_accum=2)
    full = Trainer(straight).setup().train()

    split_cfg = tiny_config(corpus, tmp_path / "split", max_steps=2 * n, seed=seed, grad_accum=2)
    first = Trainer(split_cfg).setup().train(until=n)
    assert first.step == n and first.checkpoint.name == f"step-{n:06d}"
    resumed = Trainer(split_cfg).setup()
    second = resumed.train(resume=True)

    assert len(full.losses) == 2 * n
    assert first.losses + second.losses == full.losses  # bitwise: exact float equality
    assert _metric_losses(tmp_path / "split") == _metric_losses(tmp_path / "straight")
    a = MambaMoEForCausalLM.from_pretrained(full.checkpoint).state_dict()
    b = MambaMoEForCausalLM.from_pretrained(second.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_complete_and_pruned(corpus, tmp_path) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=6, save_every=2, keep_last=2)
    result = Trainer(cfg).setup().train()
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-000004", "step-000006"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    model = MambaMoEForCausalLM.from_pretrained(result.checkpoint)
    tok = load_tokenizer(result.checkpoint)
    from transformers import AutoTokenizer, PretrainedConfig

    auto = AutoTokenizer.from_pretrained(str(result.checkpoint), config=PretrainedConfig())
    ids = tok.encode("def f(x):\n    return x\n")
    assert auto.encode("def f(x):\n    return x\n") == ids
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), model.config.vocab_size)
    assert result.val and result.val["val_ppl"] > 1


def test_nan_stops_and_keeps_last_good(corpus, tmp_path) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=8, save_every=2)
    trainer = Trainer(cfg).setup()

    def poison(module, inputs, output):  # the third optimizer step sees a NaN loss
        return output * float("nan") if module.training and trainer.step >= 2 else output

    trainer.model.embed.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="step-000002") as info:
        trainer.train()
    assert "step 3" in str(info.value)
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-000002"]
    assert MambaMoEForCausalLM.from_pretrained(kept[0]) is not None
    assert '"event": "diverged"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_nan_gradient_with_finite_loss_stops(corpus, tmp_path) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=6, save_every=2)
    trainer = Trainer(cfg).setup()
    param = next(p for p in trainer.model.parameters() if p.dim() == 2)
    param.register_hook(lambda g: g * float("nan") if trainer.step >= 2 else g)
    with pytest.raises(TrainingDiverged, match="gradient norm is nan at step 3"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000002"]
