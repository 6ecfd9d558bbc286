"""What every benchmark records about where it ran, and how it files its table."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
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


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events around each call), after warm-up."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
