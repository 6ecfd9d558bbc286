"""The one check that a device name is a device this machine has, for every command that takes one.

torch itself fails late and obscurely: ``"cuda"`` on a CPU-only build raises an AssertionError deep in the
first ``.to()``, ``"cuda:3"`` on a one-GPU machine a RuntimeError at the first kernel. Here the name is
refused at once, by field, with what is available instead.
"""

from __future__ import annotations

import torch

from .validation import ConfigError


def resolve_device(name: str | torch.device | None, field: str = "device") -> torch.device | None:
    """``name`` as a ``torch.device`` (``"auto"``: CUDA when present, else the CPU; None stays None).

    Raises :class:`ConfigError` (a ValueError) naming ``field`` when the name is not a device or this
    machine lacks it.
    """
    if name is None:
        return None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{field}: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{field}: {name!r} asked for, but CUDA is not available ({why}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{field}: {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}: {name!r} asked for, but MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise ConfigError(f"{field}: {name!r} is not supported (cpu, cuda or mps)")
    return device
