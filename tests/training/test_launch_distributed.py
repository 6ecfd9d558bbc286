"""The documented torchrun launch, with a rank killed: 2 gloo processes (CPU).

Launch 1 (a worker script, so that one launch holds both runs): a DDP run straight through, then the same
run again, whose rank 1 SIGKILLs itself at the start of step 5, after checkpoint step 4. The job must
end (non-zero) without hanging and leave step 4 complete. Launch 2 is the command docs/training.md shows,
with ``--resume``: it must continue to the straight run's losses and weights bit for bit. And the
commands docs/training.md shows are checked to be that same command (``distributed.launch_command``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from helpers.training import tiny_config, tiny_corpus
from safetensors.torch import load_file

from mamba_moe.checkpoint_dirs import incomplete_reason
from mamba_moe.training.distributed import launch_command

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"
KILL_AT = 4  # rank 1 dies when step 5 starts; checkpoints every 2 steps, so step 4's is the last one
TIMEOUT_S = 300  # a hang fails the test instead of blocking CI (a run here takes ~15 s)

WORKER = f'''
import os, signal, sys
import torch.distributed as dist
from mamba_moe.training import TrainConfig, Trainer

config, straight = sys.argv[1:3]
Trainer(TrainConfig.load(config, [f"output={{straight}}"]), log=lambda s: None).setup().train()
killed = Trainer(TrainConfig.load(config), log=lambda s: None).setup()
if dist.get_rank() == 1:
    step = killed.train_step
    def train_step():
        if killed.step == {KILL_AT}:
            os.kill(os.getpid(), signal.SIGKILL)
        return step()
    killed.train_step = train_step
killed.train()
'''


def torchrun(*args: str) -> list[str]:
    """``torchrun ARGS`` with this interpreter (torchrun's console script is ``torch.distributed.run:main``)."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_bounded(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; past TIMEOUT_S the whole session is killed and the test fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} did not end within {TIMEOUT_S} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launch")
    corpus = tiny_corpus(root)
    config = root / "ddp.yaml"
    tiny_config(corpus, root / "killed", batch_size=2, max_steps=6, save_every=2, eval_every=6, grad_accum=2,
                sample_tokens=0).save(config)
    (root / "worker.py").write_text(WORKER)
    killed = run_bounded(torchrun("--standalone", "--nproc_per_node", "2", str(root / "worker.py"), str(config),
                                  str(root / "straight")))
    after_kill = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    resume_cmd = torchrun(*launch_command(2)[1:], "--config", str(config), "--resume")
    resumed = run_bounded(resume_cmd)
    return {"root": root, "config": config, "killed": killed, "after_kill": after_kill, "resumed": resumed,
            "resume_cmd": resume_cmd}


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_leaves_the_last_checkpoint_whole(killed_and_resumed) -> None:
    root, killed = killed_and_resumed["root"], killed_and_resumed["killed"]
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "SIGKILL" in killed.stderr, killed.stderr[-3000:]  # torchrun names the rank's signal
    assert killed_and_resumed["after_kill"] == ["step-000002", "step-000004"]
    assert incomplete_reason(root / "killed" / "checkpoints" / "step-000004", resume=True) is None


@pytest.mark.slow
def test_resume_after_a_killed_rank_continues_bitwise(killed_and_resumed) -> None:
    root, resumed = killed_and_resumed["root"], killed_and_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / 'killed' / 'checkpoints' / 'step-000004'} at step 4" in resumed.stdout
    got, ref = _records(root / "killed"), _records(root / "straight")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    a = load_file(str(root / "killed" / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(root / "straight" / "checkpoints" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def documented_commands() -> list[list[str]]:
    """Every ``torchrun ...`` command in backticks in docs/training.md, split as a shell would."""
    return [shlex.split(cmd) for cmd in re.findall(r"`(torchrun [^`]+)`", DOCS.read_text())]


def test_torchrun_is_torch_distributed_run() -> None:
    """The tests run ``python -m torch.distributed.run``: the module behind the ``torchrun`` command."""
    (script,) = entry_points(group="console_scripts", name="torchrun")
    assert script.value == "torch.distributed.run:main"


def launch_parts(cmd: list[str]) -> tuple[str, str, list[str]]:
    """(process count, config file, trailing options) of a launch of ``mamba-moe train``; fails unless ``cmd``
    is ``launch_command(n) --config FILE`` followed only by ``--resume`` and ``key=value`` overrides."""
    assert len(cmd) > 8, cmd
    expected = launch_command(cmd[3]) + ["--config"]
    assert cmd[:len(expected)] == expected, (cmd, expected)
    extras = cmd[len(expected) + 1:]
    assert all(x == "--resume" or "=" in x for x in extras), extras
    return cmd[3], cmd[len(expected)], extras


@pytest.mark.slow
def test_documented_launch_is_the_tested_one(killed_and_resumed) -> None:
    documented = [launch_parts(cmd) for cmd in documented_commands()]
    assert any("--resume" in extras for _, _, extras in documented), documented  # the resume the test runs
    ran = killed_and_resumed["resume_cmd"]
    assert ran[:3] == torchrun()
    assert launch_parts(["torchrun", *ran[3:]]) == ("2", str(killed_and_resumed["config"]), ["--resume"])


def test_time_limit_names_the_launch_that_continues_the_run(monkeypatch) -> None:
    """``--time-limit`` prints the command that continues: under torchrun on one machine, the documented one;
    on several, torchrun's own options are not known to the process, so only the part after them."""
    from mamba_moe.training.cli import _train_command

    assert _train_command(1) == "mamba-moe train"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shlex.split(_train_command(2)) == launch_command(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _train_command(16) == "torchrun <the same options> -m mamba_moe train"
