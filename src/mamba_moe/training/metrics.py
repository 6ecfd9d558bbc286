"""Where step metrics go: ``<output>/metrics.jsonl`` (one JSON line per step) and, optionally, TensorBoard.

Only the main rank writes; the other ranks get a writer that does nothing. TensorBoard gets every numeric
field as a scalar under its own name (``loss``, ``lr``, ``val_loss/code``, ``expert_load/3``, ...) in
``<output>/tensorboard``; ``torch.utils.tensorboard`` needs the ``tensorboard`` package
(``pip install 'mamba-moe[tensorboard]'``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import ConfigError


class MetricsWriter:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self._jsonl = (out / "metrics.jsonl").open("a") if enabled else None
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
