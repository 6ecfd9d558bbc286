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

from ..backends.base import Backend, ChoiceRequest, ChoiceResult, GenRequest, GenResult, RollingScore
from ..errors import EvalError


@dataclass(frozen=True)
class RollingRequest:
    """Score a whole document (perplexity)."""

    text: str

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text}


Request = GenRequest | RollingRequest | ChoiceRequest
Output = GenResult | RollingScore | ChoiceResult


MODEL = "model"   # Item.backend of the model under evaluation


@dataclass
class Item:
    """One request and what counts as right. ``backend``: who answers it, the model under evaluation or a
    helper the task names in ``Task.helpers`` (a judge); ``meta`` keys starting with ``_`` stay out of the
    sample records (they are still part of the cache key)."""

    id: str
    request: Request
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    backend: str = MODEL


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

    def cannot_run_on(self, backend: Any) -> str | None:
        """Why this task, as configured, cannot run on ``backend`` (the report's ``skipped``), or None.

        The runner asks before a task starts, so one task the backend cannot serve is skipped with its
        reason while the others in the same run still run."""
        if self.needs_scoring and not backend.can_score:
            return f"the {backend.info.kind} backend cannot score text (no log-probabilities)"
        return None

    def settings(self) -> dict[str, Any]:
        """What the report states about how the task ran (also part of each sample's cache key)."""
        return {"mode": "chat" if self.chat else "base", "seed": self.seed, **self.options}

    def cache_settings(self) -> dict[str, Any]:
        """The settings that make a sample (part of its cache key); by default all of ``settings``. A task
        leaves out settings that only some of its items depend on (a judge's name: answers do not)."""
        return self.settings()

    def helpers(self) -> dict[str, str]:
        """Other models the task asks, by name (e.g. {"judge": MODEL}); ``"self"`` is the model under
        evaluation. The runner opens each one (once per run) and hands them over through ``attach``."""
        return {}

    def attach(self, helpers: dict[str, Backend]) -> None:
        """The opened helper backends (the runner calls this before ``items``)."""
        self.helper_backends = helpers

    @abstractmethod
    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        """The items to run, in a fixed order (``limit``: the first ``limit`` of them)."""

    def followups(self, finished: Sequence[tuple[Item, dict[str, Any]]]) -> list[Item]:
        """Items that need the answers of others (a second turn sees the first answer, a judge both), built
        from the (item, record) pairs of the last round, in order; the runner runs rounds until this is
        empty. Each follow-up's request holds what it depends on, so its cache key changes with it."""
        return []

    @abstractmethod
    def score(self, items: Sequence[Item], outputs: Sequence[Output]) -> list[dict[str, Any]]:
        """A verdict per item: a JSON object with at least ``score`` (a float, or None when not scorable)."""

    @abstractmethod
    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """{"value", "ci95": [lo, hi], "n", ...} over the finished records (each has meta, target, verdict)."""
