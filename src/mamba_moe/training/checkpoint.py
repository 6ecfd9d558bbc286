"""Training checkpoints: a complete inference directory plus everything an exact resume needs.

Layout of ``<output>/checkpoints/step-000123/``::

    model.safetensors, config.json            MambaMoEForCausalLM.save_pretrained
    tokenizer.json, tokenizer_config.json, …  AutoTokenizer.from_pretrained(dir) works
    train_config.yaml                          the TrainConfig of the run
    trainer_state.pt                           optimizer, step, loader state, RNG states (python, numpy, torch)

Each checkpoint is written into a hidden temp directory and renamed into place, so a crash or a full disk
leaves the previous checkpoints untouched; only ``keep_last`` finished ones are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_directory

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temp directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any],
                    config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_directory(final) as tmp:  # a step written again (a resumed run) is replaced whole
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "train_config.yaml").write_text(config_yaml)
        torch.save(state, tmp / STATE_NAME)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # from a run killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (our own file: full unpickling is intended)."""
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)
