"""Where step metrics go: ``<output>/metrics.jsonl`` (one JSON line per step) and, optionally, TensorBoard.

Only the main rank writes; the other ranks get a writer that does nothing. ``metrics.jsonl`` holds one
record per step of the run whose checkpoints are in the folder: when a run resumes at step S (or starts
over at 0), the records after S that an interrupted run wrote are dropped first (:func:`drop_after`), so
no step appears twice. TensorBoard gets every numeric
field as a scalar under its own name (``loss``, ``lr``, ``val_loss/code``, ``expert_load/3``, ...) in
``<output>/tensorboard``; ``torch.utils.tensorboard`` needs the ``tensorboard`` package
(``pip install 'mamba-moe[tensorboard]'``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..validation import ConfigError

METRICS_NAME = "metrics.jsonl"


def drop_after(out: Path, step: int) -> int:
    """Remove the records of ``<out>/metrics.jsonl`` past ``step`` (and a torn last line); returns how many."""
    path = out / METRICS_NAME
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the half-written last line of a killed run
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write(path, "".join(f"{line}\n" for line in kept))
    return dropped


class MetricsWriter:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self._jsonl = (out / METRICS_NAME).open("a") if enabled else None
        self._tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("tensorboard: true needs the 'tensorboard' package "
                                  "(pip install tensorboard, or the 'tensorboard' extra)") from err
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """One step's record (must hold ``step``)."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None and "step" in record:
            for key, value in scalars(record):
                self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The finite numbers of a record as (tag, value); lists become ``tag/i``; ``step`` is the x axis."""
    out = []
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((key, float(value)))
        elif isinstance(value, list):
            out += [(f"{key}/{i}", float(v)) for i, v in enumerate(value) if isinstance(v, int | float)]
    return out
