"""What a task is: items (a request + what counts as right), a scorer, and an aggregate with its interval.

The runner owns caching, batching and the report; a task module only knows its data, its prompt format
and its scorer, so each can be read (and unit-tested) on its own. Options come from
``--set TASK.NAME=VALUE`` and are declared in ``OPTIONS`` with a parser and a default, so a typo is an
error naming the option rather than a silently ignored setting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..backends.base import Backend, GenRequest, GenResult, RollingScore
from ..errors import EvalError


@dataclass(frozen=True)
class RollingRequest:
    """Score a whole document (perplexity)."""

    text: str

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text}


Request = GenRequest | RollingRequest
Output = GenResult | RollingScore


@dataclass
class Item:
    id: str
    request: Request
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    parse: Callable[[str], Any]
    default: Any
    help: str


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("expected at least one integer")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("expected at least one number")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


class Task(ABC):
    """One benchmark. ``chat``: the model is addressed with chat messages rather than a plain prompt."""

    name: ClassVar[str]
    metric: ClassVar[str]
    needs_scoring: ClassVar[bool] = False       # needs Backend.can_score (log-likelihoods)
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, options: dict[str, str] | None = None, *, seed: int = 0, chat: bool = False,
                 data_dir: str | None = None) -> None:
        self.seed, self.chat, self.data_dir = seed, chat, data_dir
        self.options: dict[str, Any] = {name: opt.default for name, opt in self.OPTIONS.items()}
        for key, text in (options or {}).items():
            if key not in self.OPTIONS:
                known = ", ".join(sorted(self.OPTIONS)) or "none"
                raise EvalError(f"--set {self.name}.{key}: unknown option of task {self.name} (known: {known})")
            try:
                self.options[key] = self.OPTIONS[key].parse(text)
            except ValueError as err:
                raise EvalError(f"--set {self.name}.{key}={text}: {err}") from None

    def settings(self) -> dict[str, Any]:
        """What the report states about how the task ran (also part of each sample's cache key)."""
        return {"mode": "chat" if self.chat else "base", "seed": self.seed, **self.options}

    @abstractmethod
    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        """The items to run, in a fixed order (``limit``: the first ``limit`` of them)."""

    @abstractmethod
    def score(self, items: Sequence[Item], outputs: Sequence[Output]) -> list[dict[str, Any]]:
        """A verdict per item: a JSON object with at least ``score`` (a float, or None when not scorable)."""

    @abstractmethod
    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """{"value", "ci95": [lo, hi], "n", ...} over the finished records (each has meta, target, verdict)."""
