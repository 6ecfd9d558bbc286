"""The tasks by name: each module holds its prompts and scorer; ``TASKS`` maps ``--tasks`` names to classes."""

from __future__ import annotations

import importlib

from ..errors import EvalError
from .base import Item, Task

_TASKS = {"gsm8k": "gsm8k:GSM8K", "humaneval": "humaneval:HumanEval", "ppl": "ppl:Perplexity",
          "passkey": "passkey:Passkey", "mqar": "mqar:MQAR"}
TASK_NAMES = tuple(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        hint = " (MT-Bench-local is not built yet)" if name.startswith("mt") else ""
        raise EvalError(f"--tasks: unknown task {name!r}{hint}; known: {', '.join(TASK_NAMES)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["Item", "TASK_NAMES", "Task", "task_class"]
