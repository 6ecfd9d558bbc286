"""Switching a trained checkpoint's RoPE scaling: YaRN on after training with plain RoPE, or off again.

YaRN rescales the rotary frequencies statically (``ops/rope.py``), so a model trained with it on from the first
step has never seen the angles beyond its training length and is extended by nothing. Trained with plain RoPE
and switched on afterwards, it is (docs/results.md, "Long context": held-out loss over 32k windows of two
300M hybrids trained at 8k, 2.76 / 2.79 with plain RoPE, 2.62 / 2.66 with YaRN x4 switched on afterwards).

The switch is written as a new checkpoint: ``config.json`` with the new ``rope_scaling`` and
``max_position_embeddings``, ``model.safetensors`` unchanged (hard-linked, or copied where a link cannot be
made), the tokenizer and chat template carried, and the operation appended to ``growth.json`` (``mamba-moe
info`` lists it). The output appears whole or not at all; the source is never modified.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory
from ..checkpoint_dirs import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from ..config import MambaMoEConfig
from .checkpoint import HISTORY_NAME, history_entry, read_history, source_dir, write_history
from .common import GrowthError, config_changes
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_INFO
from .trained_length import TRAIN_CONFIG_NAME, Lineage, trained_lineage, written_by_training

OPERATION = "extend_context"
# The preset's betas, and the only ones llama.cpp's granitehybrid applies (export/granite_rules.py).
YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}
# Rewritten (config, history), shared unchanged (weights), or belonging to the training run or the LoRA adapter
# rather than to the model (a LoRA checkpoint's model.safetensors already holds the adapter merged in).
_NOT_CARRIED = {CONFIG_NAME, WEIGHTS_NAME, HISTORY_NAME, STATE_NAME, TRAIN_CONFIG_NAME, ADAPTER_CONFIG,
                ADAPTER_WEIGHTS, BASE_INFO}


@dataclass
class ContextReport:
    source: Path
    output: Path
    changes: dict[str, list]
    detail: str                       # where the new lengths came from
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{OPERATION}: {self.source} -> {self.output}"]
        out += [f"  {name}: {old!r} -> {new!r}" for name, (old, new) in self.changes.items()]
        out.append(f"  {self.detail}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def describe_rope(config: MambaMoEConfig) -> str:
    """One line: which rotary embedding the model computes, and over how many positions."""
    if "attention" not in config.layer_mixers:
        return "no attention layers, so no rotary embeddings (Mamba2 only: no position limit to extend)"
    rs = config.rope_scaling
    if rs is None:
        return (f"plain RoPE (rope_theta {config.rope_theta:g}), max_position_embeddings "
                f"{config.max_position_embeddings:,}")
    betas = ", ".join(f"{k} {rs[k]:g}" for k in ("beta_fast", "beta_slow") if k in rs)
    return (f"YaRN x{rs['factor']:g} over an original {rs['original_max_position_embeddings']:,} positions "
            f"(rope_theta {config.rope_theta:g}{', ' + betas if betas else ''}), max_position_embeddings "
            f"{config.max_position_embeddings:,}")


def yarn_scaling(factor: float, original_length: int) -> dict[str, Any]:
    return {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original_length),
            **YARN_BETAS}


def _load(checkpoint: str | os.PathLike) -> tuple[Path, MambaMoEConfig]:
    src = source_dir(checkpoint)
    config = MambaMoEConfig.load(src / CONFIG_NAME)
    if "attention" not in config.layer_mixers:
        raise GrowthError(f"checkpoint: {src} has no attention layers (layer_mixers are all mamba), so no rotary "
                          "embeddings to scale; a Mamba2-only model has no position limit to extend")
    return src, config


def _check_output(output: str | os.PathLike, src: Path, overwrite: bool) -> Path:
    out = Path(output)
    here, there = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if here == there:
        raise GrowthError(f"output: {out} is the checkpoint itself; write the result to a new directory (the "
                          "source is never modified)")
    if there.is_relative_to(here):
        raise GrowthError(f"output: {out} contains the checkpoint {src}; replacing it would delete the source")
    if here.is_relative_to(there):
        raise GrowthError(f"output: {out} is inside the checkpoint {src}; write the result beside it (the source "
                          "is never modified)")
    if out.exists():
        if not out.is_dir():
            raise GrowthError(f"output: {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise GrowthError(f"output: {out} exists and is not empty; choose a new directory or pass --overwrite")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link shares the bytes without a copy. Safe because no writer in the project rewrites a file in
    # place: each writes a new file and renames it over the old name (atomic.py), which leaves a link alone.
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _write(src: Path, config: MambaMoEConfig, out: Path, history: list[dict[str, Any]]) -> list[str]:
    """The new checkpoint, atomically; returns notes on what was left behind."""
    notes = []
    with atomic_directory(out) as tmp:
        _link_or_copy(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        config.save(tmp / CONFIG_NAME)
        for item in sorted(src.iterdir()):
            if item.name in _NOT_CARRIED or item.name.startswith(".") or not item.is_file():
                continue
            shutil.copy2(item, tmp / item.name)  # tokenizer.json, tokenizer_config.json, chat template, ...
        write_history(tmp, history)
    if (src / ADAPTER_CONFIG).exists():
        notes.append("the LoRA adapter files were not carried: model.safetensors holds the adapter merged in")
    return notes


def _original_length(src: Path, config: MambaMoEConfig, given: int | None) -> tuple[int, str, dict[str, Any]]:
    """(original length, where it came from, facts for the history)."""
    if given is not None:
        length = given
        origin, facts = "given (--original-length)", {}
    else:
        lineage = trained_lineage(src)
        if lineage.length is None:
            raise GrowthError(f"original_length: the length {src} was trained at is {lineage.summary()}; give it "
                              "with --original-length N (the longest seq_len it was trained with)")
        length, origin = lineage.length, f"trained at {lineage.summary()}"
        facts = {"trained_lengths": [{"train_config": str(r.train_config), "seq_len": r.seq_len}
                                     for r in lineage.runs]}
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise GrowthError(f"original_length: must be a positive integer (got {length!r})")
    if length > config.max_position_embeddings:
        raise GrowthError(f"original_length: {length:,} exceeds the checkpoint's max_position_embeddings "
                          f"({config.max_position_embeddings:,}); it cannot have been trained past that")
    return length, origin, facts


def extend_context(checkpoint: str | os.PathLike, output: str | os.PathLike, factor: float,
                   original_length: int | None = None, overwrite: bool = False) -> ContextReport:
    """Write ``checkpoint`` with YaRN x``factor`` switched on to ``output``.

    ``original_length`` (YaRN's ``original_max_position_embeddings``): the length the model was trained at;
    by default the longest ``seq_len`` its training runs recorded (``trained_length.py``), an error when that is
    not known. ``max_position_embeddings`` becomes ``factor`` times it.
    """
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 1:
        raise GrowthError(f"yarn: the factor must be a finite number > 1 (got {factor!r}); 4 stretches the "
                          "trained length four times")
    src, config = _load(checkpoint)
    if config.rope_scaling is not None:
        raise GrowthError(f"rope_scaling: {src} already has {describe_rope(config)}; switch it off first (--off) "
                          "to choose another scaling")
    out = _check_output(output, src, overwrite)
    length, origin, facts = _original_length(src, config, original_length)
    positions = math.floor(length * factor)
    if positions <= length:
        raise GrowthError(f"yarn: x{factor:g} of {length:,} positions gives no longer context")
    new = config.replace(rope_scaling=yarn_scaling(factor, length), max_position_embeddings=positions)
    changes = config_changes(config, new)
    entry = history_entry(OPERATION, {"yarn": float(factor), "original_length": length}, src,
                          function_preserving=False, config_changes=changes, original_length_from=origin, **facts)
    notes = _write(src, new, out, read_history(src) + [entry])
    return ContextReport(src, out, changes, f"original length {length:,}: {origin}", notes)


def _switched_on_by(src: Path, history: list[dict[str, Any]], config: MambaMoEConfig,
                    trained_since: bool = False) -> dict[str, Any] | None:
    """The growth.json entry that switched on ``config``'s scaling, when the newest context operation in
    ``history`` is the one that did and no training ran since (then the scaling was not trained with), else None.

    A run trained from the switched-on checkpoint carries its growth.json on unchanged (``Trainer``), so the
    entry alone does not tell; its own ``train_config.yaml`` does: that run trained with the scaling on.
    ``trained_since``: the entry only when such a run did train since."""
    if written_by_training(src) != trained_since:
        return None
    for entry in reversed(history):
        if entry.get("operation") == OPERATION:
            change = entry.get("config_changes", {}).get("rope_scaling")
            on = isinstance(change, list) and len(change) == 2 and change[1] == config.rope_scaling
            return entry if on else None
    return None


def remove_context_scaling(checkpoint: str | os.PathLike, output: str | os.PathLike,
                           overwrite: bool = False) -> ContextReport:
    """Write ``checkpoint`` with plain RoPE to ``output``; ``max_position_embeddings`` returns to the scaling's
    original length."""
    src, config = _load(checkpoint)
    rs = config.rope_scaling
    if rs is None:
        raise GrowthError(f"rope_scaling: {src} has {describe_rope(config)} already; there is no scaling to switch "
                          "off")
    out = _check_output(output, src, overwrite)
    history = read_history(src)
    notes = []
    switch = _switched_on_by(src, history, config)
    positions = (switch or {}).get("config_changes", {}).get("max_position_embeddings")
    if switch is not None and isinstance(positions, list) and positions[1] == config.max_position_embeddings:
        length = int(positions[0])  # undo that step exactly
        detail = f"max_position_embeddings back to {length:,}, as before extend-context switched the scaling on"
    else:
        length = int(rs["original_max_position_embeddings"])
        detail = f"max_position_embeddings: the scaling's original length, {length:,}"
        if _switched_on_by(src, history, config, trained_since=True) is not None:
            notes.append("extend-context switched this scaling on, then this checkpoint's training run trained with "
                         "it: plain RoPE changes the angles the model learned")
        elif switch is None:
            notes.append("this scaling was not switched on by extend-context (growth.json has no such step): the "
                         "model was trained with it, so plain RoPE changes the angles it learned")
    new = config.replace(rope_scaling=None, max_position_embeddings=length)
    changes = config_changes(config, new)
    entry = history_entry(OPERATION, {"off": True}, src, function_preserving=False, config_changes=changes,
                          **({"notes": notes} if notes else {}))
    notes += _write(src, new, out, history + [entry])
    return ContextReport(src, out, changes, detail, notes)


def context_lines(checkpoint: str | os.PathLike) -> list[str]:
    """What ``extend-context --show`` prints: the RoPE in use, the trained length, and the next command."""
    src = source_dir(checkpoint)
    config = MambaMoEConfig.load(src / CONFIG_NAME)
    lines = [f"checkpoint: {src}", f"rope: {describe_rope(config)}"]
    if "attention" not in config.layer_mixers:
        return lines
    try:
        lineage = trained_lineage(src)
    except GrowthError as err:  # a damaged record: still show the scaling
        lineage = Lineage(gap=str(err))
    lines.append(f"trained at: {lineage.summary()}")
    if config.rope_scaling is None:
        length = lineage.length
        hint = "" if length is not None else " --original-length N"
        target = f" ({4 * length:,} positions)" if length is not None else ""
        lines.append(f"switch YaRN on: mamba-moe extend-context {src} --yarn 4{hint} -o OUT{target}")
    elif _switched_on_by(src, read_history(src), config) is not None:
        lines.append("switched on by extend-context (growth.json); back to plain RoPE: "
                     f"mamba-moe extend-context {src} --off -o OUT")
    elif _switched_on_by(src, read_history(src), config, trained_since=True) is not None:
        lines.append("switched on by extend-context, then trained with it on (this checkpoint's training run): "
                     "the model has learned these angles, so --off would change them")
    else:
        lines.append("trained with this scaling on (not switched on by extend-context): the model has seen no angle "
                     "past the original length, so by docs/results.md's argument the scaling extends nothing; "
                     "train with plain RoPE and switch YaRN on afterwards (docs/training.md, \"Long context\")")
    return lines
