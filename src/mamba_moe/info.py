"""What ``mamba-moe info`` says beyond the parameter table: a checkpoint's growth history, its LoRA adapter,
and the export tiers of its model (docs/export.md, "Exportability in tiers").

The tiers are the export package's own checks, called, not restated here:

1. features a runtime cannot represent block that runtime's export, by rule name (``export_blockers`` for
   llama.cpp's GGUF, ``hf_blockers`` for transformers' GraniteMoeHybrid);
2. the row lengths of the GGUF tensors decide which file types fit (``quant_type_blockers`` over the
   tensors ``export gguf`` would write: needs the weights, so only for a checkpoint);
3. limits of some llama.cpp backends are caveats (``export_caveats``): the file is written and the CPU
   backend, a phone's, runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import MambaMoEConfig


def gguf_tier_lines(config: MambaMoEConfig, model: Any | None = None) -> list[str]:
    """Tiers 1-3 for llama.cpp; ``model`` (with its weights) adds which file types fit its tensors."""
    from .export import export_blockers, export_caveats
    from .export.gguf_export import gguf_architecture

    blockers = export_blockers(config)
    arch = gguf_architecture(config)
    if blockers:
        lines = [f"  llama.cpp GGUF ({arch}): refused ({len(blockers)} rule{'s' if len(blockers) > 1 else ''})"]
        return lines + [f"    refused by {b}" for b in blockers]
    lines = [f"  llama.cpp GGUF ({arch}): exports (`mamba-moe export gguf`; f32 computes our logits, the other "
             "types round the weights)"]
    lines.append("    file types: " + (_file_type_fit(model) if model is not None else
                                       "checked against the weights when info is given a checkpoint"))
    lines += [f"    caveat {c}" for c in export_caveats(config)]
    return lines


def _file_type_fit(model: Any) -> str:
    """Which GGUF file types the model's tensors fit, and for each that does not, the first tensor in the way."""
    from .export.errors import ExportError
    from .export.gguf_tensors import gguf_tensors
    from .export.llama_quant import FILE_TYPES, quant_type_blockers

    try:
        tensors = gguf_tensors(model)
    except ExportError as err:
        return f"none: {err}"
    fits: list[str] = []
    refused: dict[tuple[str, ...], list[str]] = {}  # the same tensors in the way: one line for those types
    for kind in FILE_TYPES.values():
        problems = tuple(quant_type_blockers(tensors, kind))
        (refused.setdefault(problems, []) if problems else fits).append(kind.name)
    parts = [", ".join(fits) + " fit" if fits else "none fit"]
    for problems, names in refused.items():
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        parts.append(f"{', '.join(names)} refused: {problems[0]}{more}")
    return "; ".join(parts)


def hf_tier_lines(config: MambaMoEConfig) -> list[str]:
    from .export.hf_export import hf_blockers

    blockers = hf_blockers(config)
    if not blockers:
        return ["  transformers (GraniteMoeHybridForCausalLM, `mamba-moe export hf`): exports, logits equal to ours"]
    return (["  transformers (GraniteMoeHybridForCausalLM): refused"]
            + [f"    refused by {b}" for b in blockers])


def export_tier_lines(config: MambaMoEConfig, model: Any | None = None) -> list[str]:
    return ["export tiers:", *gguf_tier_lines(config, model), *hf_tier_lines(config)]


def history_lines(directory: Path) -> list[str]:
    """The growth history of checkpoint ``directory`` (grown, merged, or trained from one of those)."""
    from .growth.checkpoint import format_history, read_history

    history = read_history(directory)
    if not history:
        return ["growth history: none (never grown, merged or trained from a grown checkpoint)"]
    return [f"growth history ({len(history)} operation{'s' if len(history) > 1 else ''}):",
            *("  " + line for line in format_history(history).splitlines())]


def adapter_lines(directory: Path) -> list[str]:
    """A LoRA run's checkpoint: what its adapter is and which base it belongs to (empty for others)."""
    from .growth.lora import ADAPTER_CONFIG, is_adapter_dir, read_base_info

    if not is_adapter_dir(directory):
        return []
    config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    fingerprint = read_base_info(directory).get("fingerprint") or "unknown"
    targets = config.get("target_modules") or []
    params = config.get("target_parameters") or []
    return [f"LoRA adapter (PEFT format): rank {config.get('r')}, alpha {config.get('lora_alpha')}, "
            f"{len(targets) + len(params)} adapted weights; base {config.get('base_model_name_or_path')} (weights "
            f"fingerprint {fingerprint[:12]}); model.safetensors holds the base with the adapter merged in"]
