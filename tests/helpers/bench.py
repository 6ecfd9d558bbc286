"""Importing a script of bench/ in a test (the scripts import their sibling ``_machine.py``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def import_bench(name: str) -> Iterator[ModuleType]:
    """Yield bench/NAME.py as a module, with bench/ on sys.path only meanwhile (a pytest fixture's body)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
