"""`mamba-moe train`: the demo path end to end on a tiny config, and config typos as clean errors."""

from __future__ import annotations

import yaml
from helpers.training import tiny_config, tiny_corpus

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


def test_train_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys) -> None:
    import torch

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\n")
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for argv, needle in (
        (["--config", str(tmp_path)], "is a directory; give a training config file"),
        (["--config", str(path), f"device={absent}"], f"device: '{absent}' asked for, but"),
        (["--config", str(path), "device=foo"], "device: 'foo' is not a device"),
        (["--config", str(path), "model.overrides=5"], "model.overrides: expected a mapping"),
        (["--config", str(path), "output=null"], "output: must be a directory path"),
        (["--config", str(path), "seed=1.5"], "seed: must be a non-negative integer"),
        (["--config", str(path), "sample_tokens=-1"], "sample_tokens: must be a non-negative integer"),
        (["--config", str(path), "lr=.inf"], "lr: must be a finite number"),
    ):
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_train_cli_no_sample_and_a_truncated_checkpoint_named(tmp_path, capsys) -> None:
    cfg = tiny_config(tiny_corpus(tmp_path), tmp_path / "run", max_steps=1, save_every=1, sample_tokens=0)
    path = tmp_path / "tiny.yaml"
    cfg.save(path)
    assert main(["train", "--config", str(path)]) == 0
    assert "sample (" not in capsys.readouterr().out
    weights = tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["train", "--config", str(path), "output=" + str(tmp_path / "next"),
                 "--checkpoint", str(weights.parent)]) == 2
    err = capsys.readouterr().err
    assert "step-000001: not a complete checkpoint: model.safetensors is truncated" in err, err
