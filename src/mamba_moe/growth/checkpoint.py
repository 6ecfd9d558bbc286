"""Reading a checkpoint to grow and writing the grown one: whole or not at all, with its growth history.

The output is a normal checkpoint directory (``config.json`` + ``model.safetensors``, loadable with
``MambaMoEForCausalLM.from_pretrained`` and trainable with ``train --checkpoint``), the source's tokenizer
files copied beside it, and ``growth.json``: the source's history followed by one entry for this operation
(what was done, with which arguments, whether it is function-preserving and the measured logits error).
Training-only files of the source (``trainer_state.pt``: its optimizer moments have the old shapes;
``train_config.yaml``: the old run) are not copied.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory
from ..checkpoint_dirs import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, CheckpointError, resolve_model_dir
from ..model.lm import MambaMoEForCausalLM
from .common import GrowthError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_INFO

HISTORY_NAME = "growth.json"
# A LoRA run's checkpoint also holds its adapter, which fits the base, not the grown or merged model.
_NOT_COPIED = {CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, HISTORY_NAME, "train_config.yaml", ADAPTER_CONFIG,
               ADAPTER_WEIGHTS, BASE_INFO}


def source_dir(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory ``path`` names (a checkpoint, a run folder or its checkpoints/)."""
    try:
        return resolve_model_dir(path, notify=None)
    except CheckpointError as err:
        raise GrowthError(f"checkpoint: {err}") from None


def load_source(path: str | os.PathLike) -> tuple[Path, MambaMoEForCausalLM]:
    directory = source_dir(path)
    return directory, MambaMoEForCausalLM.from_pretrained(directory)


def check_output(output: str | os.PathLike, sources: list[Path], overwrite: bool = False) -> Path:
    """``output`` as a Path, refused when it is one of the inputs or exists (unless ``overwrite``)."""
    out = Path(output)
    for src in sources:
        if out.resolve() == Path(src).resolve():
            raise GrowthError(f"output: {out} is an input ({src}); write the result somewhere else")
    if out.exists() and not overwrite:
        raise GrowthError(f"output: {out} exists; choose a new directory or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise GrowthError(f"output: {out} exists and is not a directory")
    return out


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The growth history of a checkpoint directory (empty for one that was never grown)."""
    file = Path(path) / HISTORY_NAME
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GrowthError(f"{file}: unreadable growth history: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("history"), list):
        raise GrowthError(f"{file}: not a growth history (expected {{\"history\": [...]}})")
    return data["history"]


def write_history(directory: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """``growth.json`` in ``directory`` (a checkpoint being written: the caller makes it appear whole)."""
    (Path(directory) / HISTORY_NAME).write_text(json.dumps({"history": history}, indent=2) + "\n", encoding="utf-8")


def format_history(history: list[dict[str, Any]]) -> str:
    """One line per operation, oldest first (``mamba-moe info``): what, with which arguments, whether it kept
    the logits (and the measured error), the held-out loss, when, and the parameter count before -> after."""
    lines = []
    for i, entry in enumerate(history, 1):
        args = ", ".join(f"{k}={v}" for k, v in entry.get("arguments", {}).items())
        check = entry.get("check", {})
        if entry.get("operation") == "lora_merge":
            kind, err = "adapter folded in", check.get("merged_vs_adapted_max_rel_error")
        else:
            kind = "function-preserving" if entry.get("function_preserving") else "not function-preserving"
            err = check.get("max_rel_error")
        extra = f", logits rel. error {err:.1e}" if isinstance(err, float) else ""
        loss = entry.get("heldout")
        if loss:
            extra += f", held-out loss {loss['loss_before']:.4f} -> {loss['loss_after']:.4f}"
        params = entry.get("parameters")
        if isinstance(params, dict) and {"before", "after"} <= set(params):
            extra += f", parameters {params['before']:,} -> {params['after']:,}"
        if entry.get("time"):
            extra += f", {entry['time']}"
        lines.append(f"{i}. {entry.get('operation')}({args}): {kind}{extra}")
    return "\n".join(lines)


def history_entry(operation: str, arguments: dict[str, Any], source: Path, **facts: Any) -> dict[str, Any]:
    return {"operation": operation, "arguments": arguments, "source": str(Path(source).resolve()),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **facts}


def write_checkpoint(model: MambaMoEForCausalLM, output: Path, side_files_from: Path,
                     history: list[dict[str, Any]]) -> Path:
    """Write ``model``, the side files (tokenizer, ...) of ``side_files_from`` and ``history`` to ``output``,
    atomically: until the rename, ``output`` is absent (or its previous contents, with --overwrite)."""
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        for item in sorted(Path(side_files_from).iterdir()):
            if item.name in _NOT_COPIED or item.name.startswith("."):
                continue
            if item.is_file():  # tokenizer.json, tokenizer_config.json, chat template, ...
                shutil.copy2(item, tmp / item.name)
        write_history(tmp, history)
    return output
