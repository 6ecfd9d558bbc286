"""`mamba-moe train`: the demo path end to end on a tiny config, and config typos as clean errors."""

from __future__ import annotations

import yaml
from test_training_common import tiny_config, tiny_corpus

from mamba_moe.cli import main
from mamba_moe.model import MambaMoEForCausalLM


def test_train_cli_demo_path(tmp_path, capsys) -> None:
    cfg = tiny_config(tiny_corpus(tmp_path), tmp_path / "run", max_steps=4, eval_every=2, save_every=4)
    path = tmp_path / "tiny.yaml"
    cfg.save(path)
    assert main(["train", "--config", str(path), "lr=0.002", "sample_prompt='class '"]) == 0
    out = capsys.readouterr().out
    assert "final validation loss" in out and "unigram entropy" in out
    assert "sample (8 tokens" in out and "\nclass " in out
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    assert MambaMoEForCausalLM.from_pretrained(ckpt).config.vocab_size == 512
    assert yaml.safe_load((ckpt / "train_config.yaml").read_text())["lr"] == 0.002
    # --resume at max_steps: nothing left to do, still a clean report
    assert main(["train", "--config", str(path), "--resume", "lr=0.002"]) == 0
    assert "checkpoint: " + str(ckpt) in capsys.readouterr().out


def test_train_cli_typo(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\n")
    assert main(["train", "--config", str(path), "max_setps=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
