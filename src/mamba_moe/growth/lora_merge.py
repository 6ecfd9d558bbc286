"""``mamba-moe lora merge BASE ADAPTER -o OUT``: a plain checkpoint with the adapter folded in."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from ..checkpoint_dirs import CheckpointError, resolve_model_dir
from .checkpoint import check_output, history_entry, load_source, read_history, write_checkpoint
from .common import GrowthError, check_ids, default_tolerance, logits_rel_error, model_dtype
from .lora import ADAPTER_CONFIG, is_adapter_dir, load_lora, merge_lora


def adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter directory ``path`` names: one itself, or a LoRA training run (its folder, ``checkpoints/``
    or a step directory: the newest complete checkpoint, which holds the run's adapter)."""
    path = Path(path)
    if is_adapter_dir(path):
        return path
    try:
        found = resolve_model_dir(path, notify=None)
    except CheckpointError:
        found = None
    if found is not None and is_adapter_dir(found):
        return found
    where = f" nor does its newest checkpoint {found}" if found is not None and found != path else ""
    raise GrowthError(f"adapter: {path} holds no {ADAPTER_CONFIG}{where}; give an adapter directory (save_lora) or "
                      "a LoRA training run (a training config with a lora: section)")


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                     check_base: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Load ``base``, put the adapter (a directory or a LoRA run, :func:`adapter_dir`) on it, fold it in, check
    merged logits == adapted logits, write ``output`` (weights, the base's tokenizer files, growth history with
    a ``lora_merge`` entry)."""
    src, model = load_source(base)
    adapter = adapter_dir(adapter)
    out = check_output(output, [src, adapter], overwrite)
    model.eval()
    load_lora(model, adapter, check_base=check_base)
    adapted = copy.deepcopy(model)
    merged = merge_lora(model)
    ids = check_ids(merged.config)
    error = logits_rel_error(adapted, merged, ids)
    tolerance = default_tolerance(model_dtype(merged))
    if not error <= tolerance:
        raise GrowthError(f"check: the merged model's logits differ from the adapted model's by {error:.2e} "
                          f"(tolerance {tolerance:.0e}); nothing was written")
    n_params = merged.num_parameters()
    entry = history_entry("lora_merge", {"adapter": str(adapter)}, src, function_preserving=False,
                          parameters={"before": n_params, "after": n_params},
                          check={"merged_vs_adapted_max_rel_error": error, "tolerance": tolerance,
                                 "dtype": str(model_dtype(merged))})
    write_checkpoint(merged, out, src, read_history(src) + [entry])
    return {"base": src, "output": out, "max_rel_error": error}
