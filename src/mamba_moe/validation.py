"""One way to check configuration: one error family, one message shape, hints for typos.

Every configuration in the project (the model's, ``data prepare``'s, training's) is a dataclass read
from YAML or JSON. Their checks go through these helpers so that a mistake reads the same everywhere:

    sources[0].wieght: unknown key; did you mean 'weight'?
    schedule: 'cosin' is not one of ['cosine', 'wsd']; did you mean 'cosine'?
    lr: must be a finite number >= 0 (got inf)

The first word is always the field's dotted path (``where``), so the user finds the line in seconds.
Type checks run before any comparison, so ``seed: 1.5`` or ``workers: "4"`` is reported by name instead
of surfacing as a ``TypeError`` from inside validation. Booleans are never accepted as numbers (YAML's
``yes`` would otherwise pass as 1).

Errors derive from :class:`ConfigError` (a ``ValueError``): the model config's ``ConfigError`` *is* this
class, and ``mamba_moe.data.DataError`` is a subclass, so ``except ConfigError`` catches both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent; the message names it."""


def field_path(where: str, name: str | int) -> str:
    """``where.name`` (``where[name]`` for an index); ``name`` alone at the top level.

    A trailing dot in ``where`` is tolerated, so prefixes built as ``"data."`` work too.
    """
    where = where.rstrip(".")
    if isinstance(name, int):
        return f"{where}[{name}]"
    return f"{where}.{name}" if where else str(name)


def suggestion(value: Any, known: Iterable[Any]) -> str:
    """``"; did you mean 'x'?"`` for the known value closest to ``value``, or ``""`` when none is close."""
    names = [str(k) for k in known]
    hint = difflib.get_close_matches(str(value), names, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def unknown_key(key: Any, known: Iterable[str], where: str = "", *, list_known: bool = False) -> ConfigError:
    """The error for a key that is not a field: ``where.key: unknown key; did you mean 'k'?``.

    ``list_known`` appends every known name, for small sections where the whole list helps.
    """
    known = list(known)
    message = f"{field_path(where, str(key))}: unknown key{suggestion(key, known)}"
    if list_known:
        message += f" (known: {', '.join(known)})"
    return ConfigError(message)


def check_mapping(data: Any, where: str) -> dict[str, Any]:
    """``data`` as a dict, or an error saying a mapping was expected at ``where``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    return dict(data)


def check_keys(data: Any, known: Iterable[str], where: str = "", *, list_known: bool = False) -> dict[str, Any]:
    """``data`` as a dict after checking it is a mapping whose keys are all in ``known``."""
    data = check_mapping(data, where)
    known = list(known)
    for key in data:
        if key not in known:
            raise unknown_key(key, known, where, list_known=list_known)
    return data


def check_choice(where: str, value: T, allowed: Iterable[Any]) -> T:
    """``value`` if it is one of ``allowed``; else ``where: 'x' is not one of [...]; did you mean 'y'?``."""
    allowed = list(allowed)
    try:
        ok = value in allowed
    except TypeError:  # an unhashable or incomparable value is simply not a choice
        ok = False
    if not ok:
        raise ConfigError(f"{where}: {value!r} is not one of {allowed}{suggestion(value, allowed)}")
    return value


def check_bool(where: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not the string ``"no"``, which would read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false (got {value!r})")
    return value


def _bounds_text(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '<='} {maximum:g}")
    return " and ".join(parts)


def _in_bounds(value: float, minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> bool:
    if minimum is not None and not (value > minimum if min_open else value >= minimum):
        return False
    return maximum is None or (value < maximum if max_open else value <= maximum)


def check_int(where: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` if it is an integer (not a bool, not 1.0) within ``[minimum, maximum]``; ``None`` if optional."""
    if value is None and optional:
        return None
    bounds = _bounds_text(minimum, maximum, False, False)
    if (isinstance(value, bool) or not isinstance(value, int)
            or not _in_bounds(value, minimum, maximum, False, False)):
        what = ({(1, None): "a positive integer", (0, None): "a non-negative integer"}.get((minimum, maximum))
                or (f"an integer {bounds}" if bounds else "an integer"))
        raise ConfigError(f"{where}: must be {what}{' or null' if optional else ''} (got {value!r})")
    return value


def check_number(where: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                 min_open: bool = False, max_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite real number within the bounds (``*_open``: bound excluded).

    Infinity and NaN are always refused: no configuration in the project means anything by them, and a NaN
    passes every ``<`` check (``lr: .inf`` once trained a model into NaNs that were then saved as good).
    """
    if value is None and optional:
        return None
    bounds = _bounds_text(minimum, maximum, min_open, max_open)
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not _in_bounds(value, minimum, maximum, min_open, max_open)):
        what = f"a finite number {bounds}" if bounds else "a finite number"
        raise ConfigError(f"{where}: must be {what}{' or null' if optional else ''} (got {value!r})")
    return float(value)


def coerce_float(where: str, value: Any) -> Any:
    """A string that spells a number becomes that float; anything else is returned unchanged.

    YAML 1.1 (PyYAML) reads ``3e-4`` and ``1e-5`` (no dot) as strings, while everyone reads them as numbers.
    Apply this to float-typed fields before :func:`check_number`; other strings are an error naming ``where``.
    """
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value


def float_fields(cls: type) -> set[str]:
    """Names of the dataclass ``cls``'s fields annotated ``float`` or ``float | None``."""
    return {f.name for f in dataclasses.fields(cls) if str(f.type).replace(" ", "") in ("float", "float|None")}


def check_str(where: str, value: Any, *, optional: bool = False, what: str = "a non-empty string") -> str | None:
    """``value`` if it is a non-empty string; ``None`` if optional. ``what`` words the requirement."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be {what}{' or null' if optional else ''} (got {value!r})")
    return value


def check_str_list(where: str, value: Any, *, optional: bool = False,
                   what: str = "a list of strings") -> list[str] | None:
    """``value`` if it is a list of strings (a lone string is taken as a one-item list)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be {what}{' or null' if optional else ''} (got {value!r})")
    return value


def field_names(cls: type) -> list[str]:
    """The dataclass ``cls``'s field names, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def required_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` that have no default."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def build_dataclass(cls: type[T], data: Any, where: str = "", *, list_known: bool = False,
                    ignore: Iterable[str] = ()) -> T:
    """``cls(**data)`` after checking ``data`` is a mapping of known keys that has every required one.

    Float fields given as strings (YAML's ``1e-5``) are converted first (:func:`coerce_float`).
    Keys in ``ignore`` are dropped silently (metadata that other tools write). Errors from the dataclass's
    own ``__post_init__`` validation pass through; a ``TypeError`` there is a bug in that validation (a
    comparison before a type check), re-raised as a ``ConfigError`` naming ``where`` so the user still
    learns which section is at fault.
    """
    ignore = set(ignore)
    data = {k: v for k, v in check_mapping(data, where).items() if k not in ignore}
    data = check_keys(data, field_names(cls), where, list_known=list_known)
    floats = float_fields(cls)
    data = {k: coerce_float(field_path(where, k), v) if k in floats else v for k, v in data.items()}
    missing = [name for name in required_fields(cls) if name not in data]
    if missing:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {err}") from err
