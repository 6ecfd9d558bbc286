"""Checkpoints: complete inference directories, atomic and fsynced, pruned; exact resume, also past damaged
checkpoints; clean stop on NaN loss, gradients or weights; one metrics record per step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.training import tiny_config

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


def test_non_finite_weights_are_never_saved(corpus, tmp_path) -> None:
    """An update that overflows leaves finite loss and gradients but NaN weights: the save is refused, so the
    checkpoint named as the last good one is finite."""
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=6, save_every=2)
    trainer = Trainer(cfg).setup()
    param = next(p for p in trainer.model.parameters() if p.dim() == 2)

    def overflow(optimizer, args, kwargs):  # inside optimizer.step() of step 4 (trainer.step is still 3)
        if trainer.step == 3:
            param.data.fill_(float("inf"))

    trainer.optimizer.register_step_post_hook(overflow)
    with pytest.raises(TrainingDiverged, match=r"a weight is not finite at step 4; stopped without saving\. "
                                               r"Last good checkpoint: .*step-000002") as info:
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000002"], info.value
    saved = MambaMoEForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000002")
    assert all(bool(torch.isfinite(v).all()) for v in saved.state_dict().values())


def _truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_falls_back_past_truncated_checkpoints(corpus, tmp_path, capsys) -> None:
    """Checkpoints renamed into place whose files a power loss truncated: each is named and skipped, the
    newest complete one is resumed from, and the run still ends bitwise where a straight run ends."""
    straight = Trainer(tiny_config(corpus, tmp_path / "straight", max_steps=6, save_every=2)).setup().train()
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=6, save_every=2, keep_last=3)
    Trainer(cfg).setup().train()
    ckpts = tmp_path / "run" / "checkpoints"
    _truncate(ckpts / "step-000006" / "model.safetensors", 1000)
    _truncate(ckpts / "step-000004" / "trainer_state.pt", 500)
    said: list[str] = []
    resumed = Trainer(cfg, log=said.append).setup()
    result = resumed.train(resume=True)
    log = "\n".join(said)
    assert "skipping" in log and "step-000006" in log and "model.safetensors is truncated" in log, log
    assert "step-000004" in log and "trainer_state.pt is truncated" in log, log
    assert "resumed from" in log and "step-000002 at step 2" in log
    assert result.losses == straight.losses[2:]  # bitwise, from the fallback
    # every step once in metrics.jsonl, although steps 3-6 were trained twice in this folder
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_only_damaged_checkpoints_names_the_file(corpus, tmp_path) -> None:
    from mamba_moe.checkpoint_dirs import CheckpointError

    cfg = tiny_config(corpus, tmp_path / "run", max_steps=2, save_every=2)
    Trainer(cfg).setup().train()
    _truncate(tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt", 100)
    with pytest.raises(CheckpointError, match=r"--resume: no complete checkpoint .*step-000002: trainer_state\.pt "
                                              r"is truncated"):
        Trainer(cfg, log=lambda s: None).setup().train(resume=True)


def test_no_duplicate_steps_in_metrics_after_a_resume(corpus, tmp_path) -> None:
    """A run killed after step 5 but whose last checkpoint is step 4 wrote step 5 already: the resumed run
    writes it again, and metrics.jsonl must hold it once."""
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=6, save_every=2)
    Trainer(cfg).setup().train(until=5)  # checkpoints 2, 4 and 5 (the stop)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000005")  # as if killed between steps 5 and 6
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 6, "loss"')  # and mid-line
    said: list[str] = []
    Trainer(cfg, log=said.append).setup().train(resume=True)
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any("dropped 2 record(s) after step 4" in line for line in said), said


def test_checkpoint_files_are_fsynced_before_the_rename(corpus, tmp_path, monkeypatch) -> None:
    import mamba_moe.atomic as atomic

    synced: list[str] = []
    real = atomic.fsync_file

    def record(path):
        synced.append(str(path))
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", record)
    Trainer(tiny_config(corpus, tmp_path / "run", max_steps=1, save_every=1)).setup().train()
    inside_tmp = {p.rsplit("/", 1)[1] for p in synced if "/.tmp-step-000001" in p}
    assert {"model.safetensors", "config.json", "trainer_state.pt", "tokenizer.json"} <= inside_tmp, synced


def test_time_limit_stops_saves_and_resumes_exactly(corpus, tmp_path, fresh_seed) -> None:
    """A call with a time limit ends after the step that crosses it (here: any step, the limit is tiny),
    with a checkpoint there; resuming in such slices gives the uninterrupted run's losses bit for bit."""
    seed = fresh_seed % 10_000
    straight = Trainer(tiny_config(corpus, tmp_path / "straight", max_steps=4, seed=seed, grad_accum=2)).setup()
    full = straight.train()
    cfg = tiny_config(corpus, tmp_path / "sliced", max_steps=4, seed=seed, grad_accum=2)
    losses, calls = [], 0
    while True:
        result = Trainer(cfg).setup().train(resume=calls > 0, time_limit_s=1e-9)
        calls += 1
        losses += result.losses
        assert result.checkpoint.name == f"step-{result.step:06d}"
        if not result.stopped_early:
            break
        assert len(result.losses) == 1 and calls < 4
    assert calls == 4 and result.step == 4
    assert losses == full.losses
    assert _metric_losses(tmp_path / "sliced") == _metric_losses(tmp_path / "straight")


def test_time_limit_must_be_positive(corpus, tmp_path) -> None:
    from mamba_moe.validation import ConfigError

    trainer = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=2)).setup()
    with pytest.raises(ConfigError, match="time limit"):
        trainer.train(time_limit_s=0)
