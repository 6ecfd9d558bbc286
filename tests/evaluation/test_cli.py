"""``mamba-moe eval`` as a user runs it: a real process writing report.json, report.md and samples, and errors
that name what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def eval_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mamba_moe", "eval", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MAMBA_MOE_EVAL_DATA": "/nonexistent"})


def test_eval_writes_the_report_and_resumes(toy_checkpoint, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    args = [str(toy_checkpoint), "--tasks", "gsm8k,mqar", "--limit", "2", "--output", str(out), "--seed", "4",
            "--data-dir", str(gsm8k_dir), "--set", "gsm8k.num_fewshot=1", "--set", "gsm8k.max_tokens=8",
            "--set", "mqar.contexts=1", "--threads", "1"]
    first = eval_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "gsm8k: exact_match" in first.stdout and "(n=2)" in first.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == {"gsm8k", "mqar"}
    assert report["settings"] == {"seed": 4, "limit": 2, "mode": "base", "tasks": ["gsm8k", "mqar"]}
    assert (out / "report.md").read_text().startswith("# Evaluation:")
    lines = (out / "samples" / "gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"prompt", "output", "verdict"} <= set(json.loads(lines[0]))
    second = eval_cli(*args)
    assert second.returncode == 0
    again = json.loads((out / "report.json").read_text())
    assert again["tasks"] == report["tasks"]
    assert again["run"]["tasks"]["gsm8k"]["computed"] == 0


@pytest.mark.parametrize("args, message", [
    (["--tasks", "mt-bench"], "unknown task 'mt-bench'"),
    (["--tasks", "gsm8k", "--set", "gsm8k.fewshot=3"], "--set gsm8k.fewshot: unknown option"),
    (["--tasks", "gsm8k", "--set", "mqar.pairs=3"], "task 'mqar' is not among --tasks"),
    (["--tasks", "gsm8k"], "gsm8k/test.jsonl: not found"),
])
def test_errors_name_the_problem(toy_checkpoint, tmp_path, capsys, monkeypatch, args, message):
    from mamba_moe.cli import main

    monkeypatch.setenv("MAMBA_MOE_EVAL_DATA", str(tmp_path / "no-data-here"))
    assert main(["eval", str(toy_checkpoint), "--output", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_model_that_is_not_a_model(tmp_path, capsys):
    from mamba_moe.cli import main

    assert main(["eval", str(tmp_path / "nothing"), "--tasks", "mqar", "--output", str(tmp_path)]) == 2
    assert "not a checkpoint or HF directory" in capsys.readouterr().err
