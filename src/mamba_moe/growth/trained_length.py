"""The longest sequence length a checkpoint was trained at, from what its runs recorded.

YaRN's ``original_max_position_embeddings`` is the context a model was trained at, and no single file states
it for a checkpoint's whole life: each training run writes its own ``seq_len`` into ``train_config.yaml``, and
a run started with ``--checkpoint`` records only where it started (``init_from``). The stages of
``configs/train/`` train at 2k, 2k, 4k, 8k and then 2k again, so the last run alone would say 2,048 for a model
that has trained at 8,192. Here the lineage is followed back to a run trained from scratch — ``init_from`` of
each run, the source of each operation in ``growth.json`` — and the longest ``seq_len`` on the way is the
answer.

Where a link cannot be followed (a directory moved or deleted, a checkpoint with no record of its training),
the length is unknown and the caller asks the user for it: a default that is silently too short would
interpolate frequencies the model was trained to use.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..checkpoint_dirs import CheckpointError, resolve_model_dir
from ..validation import check_int
from .checkpoint import HISTORY_NAME, read_history
from .common import GrowthError

TRAIN_CONFIG_NAME = "train_config.yaml"
# A QAT run writes <output>/final-quantized beside the run's own train_config.yaml, with none inside.
_FINAL_QUANTIZED = "final-quantized"
# Far more links than any real lineage has; a guard against a cycle of copied directories.
_MAX_LINKS = 256


@dataclass
class RunLength:
    train_config: Path
    seq_len: int


@dataclass
class Lineage:
    """The training runs found behind a checkpoint and, when the walk stopped short, why."""

    runs: list[RunLength] = field(default_factory=list)
    gap: str | None = None

    @property
    def length(self) -> int | None:
        """The longest recorded ``seq_len``, or None when part of the lineage is unknown."""
        if self.gap is not None or not self.runs:
            return None
        return max(run.seq_len for run in self.runs)

    def summary(self) -> str:
        if self.length is not None:
            longest = max(self.runs, key=lambda run: run.seq_len)
            return (f"{self.length:,} tokens (the longest seq_len of {len(self.runs)} training "
                    f"run{'s' if len(self.runs) > 1 else ''}: {longest.train_config})")
        found = ", ".join(f"{run.seq_len:,} ({run.train_config})" for run in self.runs)
        return f"not known: {self.gap}" + (f"; lengths found on the way: {found}" if found else "")


def _run_config(directory: Path) -> tuple[Path, Path | None] | None:
    """(train_config.yaml, the run's output folder or None) of a checkpoint directory, or None."""
    own = directory / TRAIN_CONFIG_NAME
    if own.is_file():
        run = directory.parent.parent if directory.parent.name == "checkpoints" else None
        return own, run
    beside = directory.parent / TRAIN_CONFIG_NAME
    if directory.name == _FINAL_QUANTIZED and beside.is_file():
        return beside, directory.parent
    return None


def written_by_training(directory: str | os.PathLike) -> bool:
    """Whether a training run wrote ``directory`` (its ``train_config.yaml``, or the run's beside a QAT
    ``final-quantized``): the run then trained the model with the config the checkpoint holds."""
    return _run_config(Path(directory)) is not None


def _read_run(file: Path) -> tuple[int, str | None, str | None]:
    """(seq_len, init_from, output) of a saved training config; a damaged file is an error naming it."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise GrowthError(f"{file}: unreadable training config: {err}") from None
    if not isinstance(data, dict):
        raise GrowthError(f"{file}: not a training config (expected a mapping)")
    seq_len = check_int(f"{file}: seq_len", data.get("seq_len"), minimum=1)
    init_from, output = data.get("init_from"), data.get("output")
    for name, value in (("init_from", init_from), ("output", output)):
        if value is not None and not isinstance(value, str):
            raise GrowthError(f"{file}: {name}: expected a path, got {value!r}")
    return seq_len, init_from, output


def _training_cwd(run_dir: Path | None, output: str | None) -> Path | None:
    """The directory a run was started from, when its relative ``output`` is the tail of where its folder is
    now: its relative ``init_from`` was relative to that directory (also after the whole tree moved)."""
    if run_dir is None or not output or Path(output).is_absolute():
        return None
    parts = [p for p in Path(output).parts if p != "."]
    here = Path(os.path.abspath(run_dir)).parts
    if not parts or ".." in parts or len(parts) >= len(here) or list(here[-len(parts):]) != parts:
        return None
    return Path(*here[:-len(parts)])


def _resolve(reference: str, bases: list[Path]) -> tuple[Path | None, str]:
    """The checkpoint a recorded path names (relative ones tried against each base, then the current
    directory), or (None, why not)."""
    path = Path(reference)
    candidates = [path] if path.is_absolute() else [base / path for base in bases] + [path]
    why = "not found"
    for candidate in candidates:
        try:
            return resolve_model_dir(candidate, notify=None), ""
        except CheckpointError as err:
            why = str(err)
    return None, why


def _history_parents(directory: Path) -> list[str] | None:
    """The checkpoints the newest growth operation of ``directory`` read (None: it has no history)."""
    history = read_history(directory)
    if not history:
        return None
    last = history[-1]
    parents = [last["source"]] if isinstance(last.get("source"), str) else []
    adapter = last.get("arguments", {}).get("adapter") if last.get("operation") == "lora_merge" else None
    if isinstance(adapter, str):  # a merged LoRA run trained too, at its own seq_len
        parents.append(adapter)
    return parents


def trained_lineage(checkpoint: str | os.PathLike) -> Lineage:
    """Every training run behind ``checkpoint`` (a complete checkpoint directory) and whether that is all."""
    lineage = Lineage()
    queue: deque[Path] = deque([Path(checkpoint)])
    seen: set[Path] = set()
    while queue:
        directory = queue.popleft()
        key = Path(os.path.realpath(directory))
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > _MAX_LINKS:
            lineage.gap = f"more than {_MAX_LINKS} checkpoints behind {checkpoint}"
            return lineage
        found = _run_config(directory)
        if found is not None:
            file, run_dir = found
            seq_len, init_from, output = _read_run(file)
            lineage.runs.append(RunLength(file, seq_len))
            references, recorded_in = ([init_from] if init_from else []), file
            bases = [b for b in (_training_cwd(run_dir, output),) if b is not None]
        else:
            references, recorded_in, bases = _history_parents(directory), directory / HISTORY_NAME, []
            if references is None:
                lineage.gap = (f"{directory} has neither {TRAIN_CONFIG_NAME} nor {HISTORY_NAME}: how long its "
                               "training sequences were is not recorded")
                return lineage
            if not references:
                lineage.gap = f"{recorded_in}: its last operation names no source checkpoint"
                return lineage
        for reference in references:
            parent, why = _resolve(reference, bases)
            if parent is None:
                lineage.gap = f"{recorded_in} started from {reference}, which cannot be read now ({why})"
                return lineage
            queue.append(parent)
    return lineage
