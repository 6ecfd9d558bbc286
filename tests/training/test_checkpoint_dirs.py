"""checkpoint_dirs: which directory is a complete checkpoint, and what a damaged one is called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mamba_moe.checkpoint_dirs import (
    CheckpointError,
    incomplete_reason,
    is_complete,
    newest_complete,
    resolve_model_dir,
    safetensors_problem,
)


def fake_checkpoint(path: Path, state: bool = True) -> Path:
    """A directory with the files a training checkpoint has (tiny tensors; the checks read headers only)."""
    path.mkdir(parents=True)
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"d_model": 8}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {}}))
    if state:
        torch.save({"step": 3, "optimizer": {"x": torch.zeros(100)}}, path / "trainer_state.pt")
    return path


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_a_whole_checkpoint_is_complete(tmp_path):
    step = fake_checkpoint(tmp_path / "step-000003")
    assert incomplete_reason(step, resume=True) is None
    assert is_complete(step) and is_complete(step, resume=True)


@pytest.mark.parametrize("keep", [None, 4, 20, -1])
def test_truncated_weights_are_named(tmp_path, keep):
    step = fake_checkpoint(tmp_path / "step-000003")
    weights = step / "model.safetensors"
    truncate(weights, None if keep is None else (keep if keep >= 0 else weights.stat().st_size - 1))
    reason = incomplete_reason(step)
    assert reason is not None and "model.safetensors" in reason
    assert not is_complete(step)


def test_trailing_bytes_and_wrong_sizes_in_the_header_are_corrupt(tmp_path):
    step = fake_checkpoint(tmp_path / "step-000001")
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 16)
    assert "model.safetensors" in (safetensors_problem(weights) or "")
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert "tensor 'a'" in (safetensors_problem(weights) or "")


def test_truncated_trainer_state_matters_for_resume_only(tmp_path):
    step = fake_checkpoint(tmp_path / "step-000003")
    truncate(step / "trainer_state.pt")
    assert is_complete(step)  # still a usable model for generate/chat/serve
    reason = incomplete_reason(step, resume=True)
    assert reason is not None and "trainer_state.pt" in reason


def test_missing_and_corrupt_side_files(tmp_path):
    step = fake_checkpoint(tmp_path / "step-000003", state=False)
    assert "trainer_state.pt" in incomplete_reason(step, resume=True)
    truncate(step / "config.json")
    assert "config.json" in incomplete_reason(step)
    (step / "config.json").unlink()
    assert incomplete_reason(step) == "missing config.json"


def test_resolve_accepts_step_dir_checkpoints_folder_and_run_folder(tmp_path):
    run = tmp_path / "run"
    for n in (2, 4, 10):
        fake_checkpoint(run / "checkpoints" / f"step-{n:06d}")
    (run / "checkpoints" / ".tmp-step-000012-abc").mkdir()  # a write in progress is never a candidate
    newest = run / "checkpoints" / "step-000010"
    assert resolve_model_dir(run) == newest
    assert resolve_model_dir(run / "checkpoints") == newest
    assert resolve_model_dir(run / "checkpoints" / "step-000004") == run / "checkpoints" / "step-000004"


def test_resolve_falls_back_past_damaged_checkpoints_saying_so(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for n in (2, 4, 6):
        fake_checkpoint(ckpts / f"step-{n:06d}")
    truncate(ckpts / "step-000006" / "model.safetensors")
    truncate(ckpts / "step-000004" / "trainer_state.pt")
    said: list[str] = []
    assert resolve_model_dir(tmp_path / "run", resume=True, notify=said.append) == ckpts / "step-000002"
    assert len(said) == 2 and "step-000006" in said[0] and "model.safetensors" in said[0]
    assert "step-000004" in said[1] and "trainer_state.pt" in said[1]
    # without resume the trainer state does not matter
    assert newest_complete(ckpts, notify=None) == ckpts / "step-000004"


def test_resolve_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_dir(tmp_path / "absent")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_model_dir(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_model_dir(tmp_path / "empty")
    step = fake_checkpoint(tmp_path / "run" / "step-000001")
    truncate(step / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*step-000001.*model\.safetensors"):
        resolve_model_dir(tmp_path / "run", notify=None)
    # a step directory named directly is used or refused, never silently replaced by another one
    with pytest.raises(CheckpointError, match=r"step-000001: not a complete checkpoint: model\.safetensors"):
        resolve_model_dir(step)
