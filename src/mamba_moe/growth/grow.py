"""``grow_checkpoint``: one operation from checkpoint to checkpoint, checked, reported and recorded.

The four operations are plain functions of a model (``add_experts``, ``add_layers``, ``dense_to_moe``,
``change_router``); this module runs one of them on a checkpoint directory, compares the logits of the
result with the source's on random tokens (a function-preserving operation whose error exceeds the dtype's
tolerance is a bug: nothing is written), measures the held-out loss when data is given, and writes the
result with its growth history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.ffn import MoEFeedForward
from ..model.lm import MambaMoEForCausalLM
from .checkpoint import check_output, history_entry, load_source, read_history, write_checkpoint
from .common import GrowthError, check_ids, config_changes, default_tolerance, logits_rel_error, model_dtype
from .evaluate import expert_load, heldout_windows, loss_report
from .experts import add_experts
from .layers import add_layers
from .router import change_router, router_change_is_exact
from .upcycle import dense_to_moe

OPERATIONS = ("add_experts", "add_layers", "dense_to_moe", "router")


@dataclass
class GrowthReport:
    operation: str
    source: Path
    output: Path | None
    function_preserving: bool
    max_rel_error: float
    tolerance: float | None
    changes: dict[str, list]
    heldout: dict[str, float] | None = None
    new_expert_weight: float | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.operation}: {self.source} -> {self.output}"]
        for name, (old, new) in self.changes.items():
            if isinstance(old, list) and len(old) > 6:
                out.append(f"  {name}: {len(old)} entries -> {len(new)} entries")
            else:
                out.append(f"  {name}: {old!r} -> {new!r}")
        kind = "function-preserving" if self.function_preserving else "NOT function-preserving"
        out.append(f"  {kind}: logits max rel. error {self.max_rel_error:.2e}"
                   + (f" (tolerance {self.tolerance:.0e})" if self.tolerance is not None else ""))
        if self.new_expert_weight is not None:
            out.append(f"  new experts' share of the routing weight: {self.new_expert_weight:.3f}")
        if self.heldout:
            h = self.heldout
            out.append(f"  held-out loss ({h['windows']} windows of {h['seq_len']}): {h['loss_before']:.4f} -> "
                       f"{h['loss_after']:.4f} ({h['loss_change']:+.4f}, perplexity x{h['ppl_ratio']:.3f})")
        out += [f"  note: {n}" for n in self.notes]
        return out


@contextlib.contextmanager
def _no_capacity_drops(*models: torch.nn.Module) -> Iterator[None]:
    """Switch capacity lifted for the check: copies share an expert's tokens arbitrarily (module docstring of
    growth.experts), so the routed outputs are compared with every token kept."""
    layers = [m for model in models for m in model.modules() if isinstance(m, MoEFeedForward)]
    saved = [m.capacity_factor for m in layers]
    for m in layers:
        m.capacity_factor = 2.0 * m.num_experts
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            m.capacity_factor = value


def apply_operation(model: MambaMoEForCausalLM, operation: str, **arguments: Any) -> tuple[MambaMoEForCausalLM,
                                                                                              bool, list[str]]:
    """(grown model, function-preserving?, notes) for one operation and its keyword arguments."""
    cfg = model.config
    notes: list[str] = []
    if operation == "add_experts":
        grown = add_experts(model, **arguments)
        exact = arguments.get("init", "split") != "noise"
        if cfg.moe_router == "switch":
            notes.append("switch: exact for calls in which the source drops no token; when it drops, the grown "
                         "model drops fewer (each copy has the source's per-expert capacity)")
        if cfg.moe_router == "topk":
            notes.append(f"moe_top_k raised to {grown.config.moe_top_k} to stay exact; --router topk:K reduces it "
                         "(not function-preserving)")
        if arguments.get("init") == "copy" and cfg.moe_router != "switch":
            notes.append("copy: exact copies receive identical gradients under soft/top-k routing and never "
                         "diverge; prefer --init split")
    elif operation == "add_layers":
        grown, exact = add_layers(model, **arguments), True
    elif operation == "dense_to_moe":
        grown, exact = dense_to_moe(model, **arguments), True
    elif operation == "router":
        grown = change_router(model, arguments["spec"])
        exact = router_change_is_exact(model, arguments["spec"])
    else:
        raise GrowthError(f"operation: {operation!r} is not one of {list(OPERATIONS)}")
    return grown, exact, notes


def grow_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, operation: str,
                    arguments: dict[str, Any], eval_data: str | os.PathLike | None = None, seq_len: int = 256,
                    eval_windows: int = 32, check: bool = True, overwrite: bool = False,
                    domain: str | None = None) -> GrowthReport:
    """Run ``operation`` (one of OPERATIONS) with ``arguments`` on ``checkpoint`` and write ``output``.

    ``eval_data``: held-out shards (a ``data prepare`` folder) or text for the loss before and after; the
    router change, which is not function-preserving, requires it. ``domain``: a data-domain label for the
    first new expert (``add_experts``), recorded in the history for ``domain_routing.experts``.
    """
    src, model = load_source(checkpoint)
    out = check_output(output, [src], overwrite)
    if operation == "router" and eval_data is None and not router_change_is_exact(model, arguments["spec"]):
        raise GrowthError("eval: --router changes the model's output; give held-out shards or text with --eval to "
                          "measure the loss change")
    if domain is not None and operation != "add_experts":
        raise GrowthError("domain: a domain label names a new expert; it goes with --add-experts only")
    model.eval()
    grown, exact, notes = apply_operation(model, operation, **arguments)

    tolerance = default_tolerance(model_dtype(model)) if exact else None
    ids = check_ids(model.config)
    with _no_capacity_drops(model, grown):
        error = logits_rel_error(model, grown, ids)
    if check and exact and not error <= tolerance:
        raise GrowthError(f"check: {operation} should leave the logits unchanged but they moved by a max rel. error "
                          f"of {error:.2e} (tolerance {tolerance:.0e}); nothing was written")

    report = GrowthReport(operation, src, out, exact, error, tolerance, config_changes(model.config, grown.config),
                          notes=notes)
    if operation == "add_experts":
        old_e = model.config.moe_num_experts
        loads = expert_load(grown, ids)
        report.new_expert_weight = sum(sum(row["weight"][old_e:]) for row in loads) / max(len(loads), 1)
    if eval_data is not None:
        from ..data import load_tokenizer

        windows = heldout_windows(eval_data, load_tokenizer(src), seq_len, eval_windows)
        if int(windows.max()) >= model.config.vocab_size:
            raise GrowthError(f"eval: token ids up to {int(windows.max())} but the model's vocab_size is "
                              f"{model.config.vocab_size}; is {eval_data} tokenised with another tokenizer?")
        report.heldout = loss_report(model, grown, windows)

    facts: dict[str, Any] = {"function_preserving": exact, "config_changes": report.changes,
                             "parameters": {"before": model.num_parameters(), "after": grown.num_parameters()},
                             "check": {"max_rel_error": error, "tolerance": tolerance, "dtype": str(model_dtype(model)),
                                       "ids_shape": list(ids.shape)}}
    if report.heldout:
        facts["heldout"] = {**report.heldout, "data": str(eval_data)}
    if notes:
        facts["notes"] = notes
    if domain is not None:
        facts["domain_experts"] = {domain: model.config.moe_num_experts}
        report.notes.append(f"domain {domain!r} -> expert {model.config.moe_num_experts}: in the training config, "
                            f"domain_routing: {{experts: {{{domain}: {model.config.moe_num_experts}}}}}")
    entry = history_entry(operation, {k: v for k, v in arguments.items() if v is not None}, src, **facts)
    write_checkpoint(grown, out, src, read_history(src) + [entry])
    return report
