"""What every benchmark records about where it ran, and how it files its table."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_markdown(path: str | None, text: str) -> None:
    """Append a benchmark's markdown section to ``path`` (e.g. docs/benchmarks.md); no-op without one."""
    if path:
        with open(path, "a") as f:
            f.write("\n" + text)
