"""The tasks by name: each module holds its prompts and scorer; ``TASKS`` maps ``--tasks`` names to classes."""

from __future__ import annotations

import importlib

from ..errors import EvalError
from .base import Item, Task

# name -> "module:Class" under tasks/; a new task is one line here (its module is imported only when asked for)
_TASKS = {
    "gsm8k": "gsm8k:GSM8K",
    "humaneval": "humaneval:HumanEval",
    "mt-bench-local": "mt_bench_local:MTBenchLocal",
    "ppl": "ppl:Perplexity",
    "passkey": "passkey:Passkey",
    "needle": "needle:Needle",
    "mqar": "mqar:MQAR",
    "memory": "memory_recall:MemoryRecall",
}
TASK_NAMES = tuple(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        hint = " (the judged chat benchmark is mt-bench-local)" if name.replace("_", "-") == "mt-bench" else ""
        raise EvalError(f"--tasks: unknown task {name!r}{hint}; known: {', '.join(TASK_NAMES)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["Item", "TASK_NAMES", "Task", "task_class"]
