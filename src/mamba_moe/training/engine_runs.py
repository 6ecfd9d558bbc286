"""Generation for the training side (the end-of-run sample, a teacher's answers) through the inference engine.

The training samplers own no decode loop: they hand token ids to :class:`mamba_moe.inference.Engine` and
read completions back. Seeded sampling on a GPU works as on the CPU: the engine draws every sampled token
with the request's CPU generator (``inference.core.sampling.sample_token``), as both samplers did before
they used the engine, so seeded samples stay what they were on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def complete(engine: Any, prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> list[Any]:
    """Completions (``mamba_moe.inference.Completion``) of token-id ``prompts``, one ``SamplingParams`` each,
    decoded together as one continuously batched run. Raises ``ValueError`` for a prompt the engine refuses."""
    requests = [engine.request(list(p), s) for p, s in zip(prompts, params, strict=True)]
    for _ in engine.run(requests):
        pass
    return [r.completion() for r in requests]
