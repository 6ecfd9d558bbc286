"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine or WSD.

A pure function needs no state of its own to checkpoint: resuming at step s gives lr(s) exactly.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """The rate for optimizer step ``step`` (0-based).

    ``cosine``: linear warmup to ``lr``, cosine down to ``min_lr`` at ``max_steps``.
    ``wsd`` (warmup-stable-decay): warmup, constant ``lr``, then a linear decay to ``min_lr`` over the last
    ``decay_fraction`` of the run — a run can be extended from any stable-phase checkpoint.
    """
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    if schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        start = max_steps - decay_steps
        if step < start:
            return lr
        return lr + (min_lr - lr) * (step - start + 1) / decay_steps
    raise ValueError(f"schedule: {schedule!r} is not 'cosine' or 'wsd'")
