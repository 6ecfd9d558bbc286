"""One trainer per output directory: a second one is refused, the lock is stale-safe, and saving never
removes another process's temporaries."""

from __future__ import annotations

import os
import signal

import pytest
from helpers.training import tiny_config

from mamba_moe.cli import main
from mamba_moe.training import Trainer
from mamba_moe.training.run_lock import LOCK_NAME, OutputInUse, OutputLock


def test_second_lock_is_refused_naming_the_holder(tmp_path) -> None:
    first = OutputLock(tmp_path / "run").acquire()
    holder = rf"\(pid {os.getpid()} on "
    with pytest.raises(OutputInUse, match=rf"output .*run: another trainer is using this directory {holder}"):
        OutputLock(tmp_path / "run").acquire()  # a second open file: flock conflicts even within one process
    assert first.acquire() is first  # re-acquiring one's own lock is a no-op
    first.release()
    with OutputLock(tmp_path / "run"):
        pass
    first.release()  # idempotent


def test_lock_of_a_killed_process_does_not_block(tmp_path) -> None:
    """SIGKILL leaves the lock file behind; the kernel has dropped the flock, so the next run proceeds."""
    pid = os.fork()
    if pid == 0:  # child: take the lock and die without releasing it
        try:
            OutputLock(tmp_path / "run").acquire()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and (tmp_path / "run" / LOCK_NAME).read_text().startswith(f"pid {pid} ")
    OutputLock(tmp_path / "run").acquire().release()


def test_a_second_trainer_on_a_live_output_is_refused(corpus, tmp_path, capsys) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=2, save_every=2)
    live = Trainer(cfg).setup()
    with pytest.raises(OutputInUse, match="another trainer is using this directory"):
        Trainer(cfg).setup()
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert main(["train", "--config", str(path)]) == 2
    assert "another trainer is using this directory" in capsys.readouterr().err
    live.train()  # the refused ones touched nothing; the live run finishes and frees the directory
    assert Trainer(cfg).setup().train(resume=True).step == 2


def test_saving_keeps_other_temporaries_and_start_removes_dead_ones(corpus, tmp_path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    dead = ckpts / ".tmp-step-000009-killed"
    dead.mkdir(parents=True)
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=4, save_every=1)
    said: list[str] = []
    trainer = Trainer(cfg, log=said.append).setup()
    other = ckpts / ".tmp-step-000100-elsewhere"

    def appear(module, inputs, output):  # a temporary that shows up while this run saves
        other.mkdir(exist_ok=True)
        return output

    trainer.model.embed.register_forward_hook(appear)
    trainer.train()
    assert not dead.exists() and any(".tmp-step-000009-killed" in line for line in said), said
    assert other.is_dir()  # four saves later: not deleted by this run
