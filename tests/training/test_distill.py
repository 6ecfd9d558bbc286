"""Distillation in the trainer: KL to a tiny local teacher falls; top-k written by `mamba-moe distill topk` and
read from disk; vocabulary mismatch errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.training import tiny_config

from mamba_moe.config import ConfigError
from mamba_moe.data import prepare_stdlib, save_tokenizer, train_tokenizer
from mamba_moe.training import Trainer


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """One of our checkpoints, trained 30 steps on the tiny corpus (far from the student's uniform start)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    torch.set_num_threads(1)
    result = Trainer(tiny_config(corpus, out, max_steps=30, save_every=30, eval_every=30, lr=1e-2, min_lr=1e-3,
                                 batch_size=4),
                     log=lambda s: None).setup().train()
    return result.checkpoint


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# A smaller student than the teacher: 2 layers instead of 4.
STUDENT = {"preset": "mamba-moe-tiny", "overrides": {"vocab_size": 512, "n_layers": 2,
                                                     "layer_mixers": ["mamba", "attention"],
                                                     "layer_ffns": ["moe", "moe"]}}


def test_student_kl_to_the_teacher_falls(corpus, teacher, tmp_path) -> None:
    cfg = tiny_config(corpus, tmp_path / "student", model=STUDENT, max_steps=10, save_every=10, eval_every=10,
                      batch_size=4, distill={"teacher": str(teacher), "alpha": 0.2, "temperature": 1.0})
    trainer = Trainer(cfg).setup()
    assert trainer.teacher is not None and trainer.teacher.kind == "mamba-moe"
    result = trainer.train()
    rows = _metrics(tmp_path / "student")
    kl = [r["kl"] for r in rows]
    assert all(x > 0 for x in kl) and all("ce" in r for r in rows)
    assert sum(kl[-3:]) / 3 < 0.85 * sum(kl[:3]) / 3, kl  # measured: 0.71 -> 0.55
    # the logged objective is alpha * CE + (1 - alpha) * T^2 * KL
    r = rows[-1]
    assert abs(r["lm_loss"] - (0.2 * r["ce"] + 0.8 * r["kl"])) < 1e-5 * r["lm_loss"]
    assert result.checkpoint is not None


def test_topk_teacher_from_distill_topk_is_read_not_computed(corpus, teacher, tmp_path) -> None:
    from mamba_moe.cli import main

    tok, _ = corpus
    small = tmp_path / "small"
    prepare_stdlib(tok, small, max_docs=3, workers=1, val_fraction=0.2)
    topk = tmp_path / "topk"
    common = {"model": STUDENT, "data": {"source": "shards", "path": str(small), "tokenizer": str(tok)},
              "max_steps": 6, "save_every": 6, "eval_every": 6, "batch_size": 4}
    spec = {"teacher": str(teacher), "alpha": 0.0, "temperature": 1.0, "topk_dir": str(topk), "topk": 16}
    # without the folder: an error naming the command that writes it, and nothing computed meanwhile
    with pytest.raises(ConfigError, match=r"distill.topk_dir: .* \(no manifest.json\).*`mamba-moe distill topk "
                                          r"--teacher .* --data .*small --seq-len 32 --k 16 --out .*topk`"):
        Trainer(tiny_config(corpus, tmp_path / "a", **common, distill=spec)).setup()
    assert not topk.exists()
    assert main(["distill", "topk", "--teacher", str(teacher), "--data", str(small), "--seq-len", "32",
                 "--k", "16", "--out", str(topk)]) == 0
    first = Trainer(tiny_config(corpus, tmp_path / "a", **common, distill=spec)).setup()
    assert first.teacher is None and len(first.topk) == len(first.train_ds) and first.topk.k == 16
    first.train()
    kl = [r["kl"] for r in _metrics(tmp_path / "a")]
    assert kl[-1] < kl[0], kl
    # the teacher is not needed any more: a second run reads the same top-k from disk
    second = Trainer(tiny_config(corpus, tmp_path / "b", **common, distill={**spec, "teacher": str(tmp_path / "gone")}))
    second.setup().train()
    assert [r["kl"] for r in _metrics(tmp_path / "b")] == kl
    # a folder for other windows, or with another k than the config expects, is refused by name
    with pytest.raises(ConfigError, match=r"distill.topk: 8, but .* holds the teacher's top-16"):
        Trainer(tiny_config(corpus, tmp_path / "c", **common, distill={**spec, "topk": 8})).setup()
    with pytest.raises(ConfigError, match=r"computed for other data or seq_len"):
        Trainer(tiny_config(corpus, tmp_path / "d", **{**common, "seq_len": 16}, distill=spec)).setup()


def test_vocabulary_mismatch_is_a_clear_error(corpus, teacher, tmp_path) -> None:
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    texts = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20]
    for f in save_tokenizer(train_tokenizer(texts, vocab_size=300), tmp_path / "tok").iterdir():
        shutil.copy(f, other / f.name)
    cfg = tiny_config(corpus, tmp_path / "s", model=STUDENT, distill={"teacher": str(other)})
    with pytest.raises(ConfigError, match="distill.teacher") as info:
        Trainer(cfg).setup()
    msg = str(info.value)
    assert str(other) in msg and str(corpus[0]) in msg and "same tokenizer" in msg
