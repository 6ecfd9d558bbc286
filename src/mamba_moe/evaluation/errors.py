"""The one error type of the evaluation harness: its message names the file, field or option at fault."""

from __future__ import annotations


class EvalError(ValueError):
    """A bad option, a missing data file or a backend that cannot do what a task needs."""
