"""MODEL strings to backends: ``openai:URL``, a ``.gguf`` file, our checkpoint directory or an HF directory.

A directory is ours when its ``config.json`` says ``"model_type": "mamba_moe"``; any other config.json is
an HF causal LM; a folder without one is taken as a training run (``checkpoint_dirs.resolve_model_dir``:
its newest complete ``step-N``). Prefixes force a kind: ``checkpoint:DIR``, ``hf:DIR``, ``gguf:FILE``, ``openai:URL``.
New backends (vLLM, ...) add a branch here and a module beside this one; tasks never change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EvalError
from .base import Backend, BackendInfo, GenRequest, GenResult, Loglikelihood, RollingScore

KINDS = ("checkpoint", "hf", "gguf", "openai")


def detect_kind(model: str) -> tuple[str, str]:
    """(kind, location) of a MODEL string, or an error saying what was expected."""
    for kind in KINDS:
        if model.startswith(kind + ":"):
            return kind, model[len(kind) + 1:]
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", model
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():   # a training run's folder or its checkpoints/: the newest complete step
            from ...checkpoint_dirs import CheckpointError, resolve_model_dir

            try:
                return "checkpoint", str(resolve_model_dir(path))
            except CheckpointError as err:
                raise EvalError(f"{model}: a model directory needs a config.json (ours or an HF causal LM), "
                                f"or a run folder with complete step-N checkpoints ({err})") from None
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as err:
            raise EvalError(f"{config}: unreadable ({err})") from err
        return ("checkpoint" if model_type == "mamba_moe" else "hf"), model
    raise EvalError(f"MODEL {model!r}: not a checkpoint or HF directory, a .gguf file, or openai:URL")


def open_backend(model: str, *, device: str = "cpu", dtype: str = "float32", max_batch: int = 16,
                 openai_model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 n_ctx: int | None = None, seed: int = 0, threads: int | None = None) -> Backend:
    kind, where = detect_kind(model)
    if kind == "checkpoint":
        from .checkpoint import CheckpointBackend

        return CheckpointBackend(where, device=device, dtype=dtype, max_batch=max_batch)
    if kind == "hf":
        from .hf import HFBackend

        return HFBackend(where, device=device, dtype=dtype)
    if kind == "gguf":
        from .gguf import GGUFBackend

        return GGUFBackend(where, n_ctx=n_ctx, seed=seed, threads=threads)
    from .openai_backend import OpenAIBackend

    return OpenAIBackend(where, model=openai_model, api_key_env=api_key_env, concurrency=concurrency)


__all__: list[Any] = ["Backend", "BackendInfo", "GenRequest", "GenResult", "KINDS", "Loglikelihood",
                      "RollingScore", "detect_kind", "open_backend"]
