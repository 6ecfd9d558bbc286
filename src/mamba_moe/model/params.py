"""Parameter accounting by component: totals, and parameters active for one token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ParamRow:
    component: str
    total: int
    active: int


def _component(name: str, model: nn.Module) -> str:
    if name.startswith("embed."):
        return "embedding (tied head)"
    if name.startswith("lm_head."):
        return "output head"
    if name.startswith("backbone.final_norm") or "_norm." in name:
        return "norms"
    index = int(name.split(".")[2])
    block = model.backbone.layers[index]
    if ".mixer." in name:
        return "mamba2 mixers" if block.mixer_kind == "mamba" else "attention mixers"
    if ".ffn.router." in name:
        return "moe routers"
    if ".ffn.experts." in name:
        return "moe routed experts"
    if ".ffn.shared_expert." in name:
        return "moe shared experts"
    return "dense ffn"


def count_parameters(model: nn.Module) -> list[ParamRow]:
    """Rows per component. Routed experts count k / E toward active (all of them for ``soft``)."""
    config = model.config
    active_share = config.effective_top_k / config.moe_num_experts
    rows: dict[str, ParamRow] = {}
    for name, param in model.named_parameters():  # named_parameters yields tied tensors once
        comp = _component(name, model)
        row = rows.setdefault(comp, ParamRow(comp, 0, 0))
        row.total += param.numel()
        row.active += round(param.numel() * active_share) if comp == "moe routed experts" else param.numel()
    return list(rows.values())


def format_parameter_table(rows: list[ParamRow]) -> str:
    total = sum(r.total for r in rows)
    active = sum(r.active for r in rows)
    lines = [f"{'component':<24}{'parameters':>16}{'active/token':>16}{'share':>8}"]
    for r in rows:
        lines.append(f"{r.component:<24}{r.total:>16,}{r.active:>16,}{100 * r.total / total:>7.1f}%")
    lines.append(f"{'total':<24}{total:>16,}{active:>16,}{100.0:>7.1f}%")
    return "\n".join(lines)
