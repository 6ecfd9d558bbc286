"""Plots and tables of the study (bench/study.py) from the files in docs/results/study/ alone.

    python bench/study_report.py                    # = python bench/study.py plot

Reads ``<name>.metrics.jsonl`` (the trainer's own records, one per step), ``longctx.json``, ``qat.json``
(the flagship's; ``longctx.NAME.json`` / ``qat.NAME.json`` for another starting model) and ``data.json``;
writes PNGs into docs/results/ and rewrites the block between the study markers in
docs/results.md with the tables, so no number there is copied by hand. matplotlib is needed for the PNGs
(``pip install matplotlib``); without it the tables are still written.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- study:begin (bench/study_report.py rewrites this block) -->", "<!-- study:end -->"
LABELS = {"hybrid-soft": "hybrid, soft MoE, 16 heads (the flagship until 2026-12-04)",
          "hybrid-topk": "hybrid, top-2 MoE", "hybrid-dense": "hybrid, dense FFN",
          "transformer": "transformer baseline",
          "hybrid-soft-h8": "hybrid, soft MoE, 8 attention heads (the flagship now)",
          "hybrid-soft-960": "hybrid, soft MoE, 16 heads, 960 steps (side by side)",
          "hybrid-soft-h8-960": "hybrid, soft MoE, 8 heads, 960 steps (side by side)"}
SIDE_BY_SIDE = {"hybrid-soft-960", "hybrid-soft-h8-960"}   # shared one GPU: their step times are not comparable


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl (events such as "diverged" and torn lines left out)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "loss" in record \
                and "event" not in record:
            records.append(record)
    return records


def tokens_per_step(records: list[dict[str, Any]], config: dict[str, Any]) -> int:
    return int(config["batch_size"] * config["grad_accum"] * config["seq_len"])


def curves(records: list[dict[str, Any]], step_tokens: int) -> dict[str, list[float]]:
    """Tokens seen, training seconds (the sum of step times: tokens per step / tokens_per_s of each step, so
    evaluations, checkpoints and the gaps between slices do not count) and the held-out losses."""
    tokens, seconds, val_tokens, val_seconds, val_loss = [], [], [], [], []
    clock = 0.0
    for r in records:
        clock += step_tokens / r["tokens_per_s"] if r.get("tokens_per_s") else 0.0
        tokens.append(r["step"] * step_tokens)
        seconds.append(clock)
        if "val_loss" in r:
            val_tokens.append(r["step"] * step_tokens)
            val_seconds.append(clock)
            val_loss.append(r["val_loss"])
    return {"tokens": tokens, "seconds": seconds, "loss": [r["loss"] for r in records],
            "val_tokens": val_tokens, "val_seconds": val_seconds, "val_loss": val_loss}


def summary(name: str, records: list[dict[str, Any]], step_tokens: int, bytes_per_token: float | None
            ) -> dict[str, Any]:
    c = curves(records, step_tokens)
    # the median step of the run, the first tenth (compilation, warm-up) left out
    rates = sorted(r["tokens_per_s"] for r in records[len(records) // 10:] if r.get("tokens_per_s")) or [math.nan]
    last_val = c["val_loss"][-1] if c["val_loss"] else math.nan
    return {"name": name, "steps": records[-1]["step"] if records else 0,
            "tokens": records[-1]["step"] * step_tokens if records else 0, "val_loss": last_val,
            "bpb": last_val / math.log(2) / bytes_per_token if bytes_per_token else math.nan,
            "tok_s": rates[len(rates) // 2], "hours": c["seconds"][-1] / 3600 if c["seconds"] else 0.0,
            "peak_gb": max((r.get("peak_memory_gb", 0.0) for r in records), default=0.0)}


def tables(results: Path) -> str:
    import yaml

    config = yaml.safe_load((ROOT / "configs/study/train.yaml").read_text())
    data = json.loads((results / "data.json").read_text()) if (results / "data.json").exists() else {}
    bpt = data.get("bytes_per_token_val")
    lines = []
    if data:
        t = data["totals"]
        lines += [f"Corpus: {t['train']['tokens']:,} training tokens in {t['train']['docs']:,} files, "
                  f"{t['val']['tokens']:,} held-out tokens in {t['val']['docs']:,} files "
                  f"({bpt:.2f} bytes per token held out).", ""]
    lines += ["| model | steps | tokens | held-out loss | bits/byte | median tok/s | train time | peak GB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    step_tokens = tokens_per_step([], config)
    for name in LABELS:
        path = results / f"{name}.metrics.jsonl"
        if not path.exists():
            lines.append(f"| {LABELS[name]} | not trained yet | | | | | | |")
            continue
        s = summary(name, read_metrics(path), step_tokens, bpt)
        lines.append(f"| {LABELS[name]} | {s['steps']} | {s['tokens'] / 1e6:.1f}M | {s['val_loss']:.4f} | "
                     f"{s['bpb']:.4f} | {s['tok_s']:,.0f} | {s['hours'] * 60:.1f} min | {s['peak_gb']:.1f} |")
    for name, path in measured_from(results, "longctx"):
        lines += longctx_table(json.loads(path.read_text()), name)
    for name, path in measured_from(results, "qat"):
        lines += qat_table(json.loads(path.read_text()), name)
    return "\n".join(lines) + "\n"


def measured_from(results: Path, kind: str) -> list[tuple[str, Path]]:
    """The ``kind`` results (longctx / qat) and the model each started from: ``kind.json`` is the flagship's,
    ``kind.NAME.json`` another model's (``bench/study.py --model NAME``)."""
    found = [("hybrid-soft", results / f"{kind}.json")] if (results / f"{kind}.json").exists() else []
    return found + [(name, results / f"{kind}.{name}.json") for name in LABELS
                    if (results / f"{kind}.{name}.json").exists()]


def longctx_table(lc: dict[str, Any], name: str) -> list[str]:
    first = next(iter(lc["variants"].values()))
    lengths = list(first["mean_to"])
    lines = ["", f"Long context, {LABELS[name]}: held-out loss by position, {lc['windows']} windows of "
             f"{lc['length']:,} tokens (trained at {lc['trained_seq_len']:,}); mean loss up to each length and "
             "per range.", "",
             "| RoPE | " + " | ".join(f"mean to {_k(int(n))}" for n in lengths) + " | "
             + " | ".join(f"{_k(b['start'])}–{_k(b['end'])}" for b in first["buckets"]) + " |",
             "|---|" + "---:|" * (len(lengths) + len(first["buckets"]))]
    for v in lc["variants"].values():
        lines.append(f"| {_rope_label(v, lc['length'])} | " + " | ".join(f"{v['mean_to'][n]:.4f}" for n in lengths)
                     + " | " + " | ".join(f"{b['loss']:.4f}" for b in v["buckets"]) + " |")
    return lines


def qat_table(q: dict[str, Any], name: str) -> list[str]:
    """Each row against two references on the same tokens: the control arm's float (what QAT costs or gains
    overall) and its own arm's float (what rounding to 4 bits costs that arm: the Q4 increase). PyTorch rows
    score 8k windows, GGUF rows (llama.cpp on the CPU) shorter ones, so a GGUF row's float is the GGUF f32 row."""
    tag = "" if name == "hybrid-soft" else f".{name}"
    lines = ["", f"QAT, from {LABELS[name]}: continued at equal tokens with and without 4-bit fake quantization; "
             "held-out loss of each in float, with its weights rounded to Q4_0 blocks in PyTorch, and as "
             "llama.cpp GGUF files (llama.cpp's own quantizer).", "",
             "| arm | form | windows x tokens | held-out loss | bits/byte | vs the control's float | "
             "vs its own float (the 4-bit increase) |", "|---|---|---|---:|---:|---:|---:|"]
    for key, row in q["rows"].items():
        arm, form = key.split("/")
        float_form = "gguf-f32" if form.startswith("gguf") else "float"
        control = q["rows"].get(f"qat-off{tag}/{float_form}", {}).get("loss")
        own = q["rows"].get(f"{arm}/{float_form}", {}).get("loss")
        where = f"{row.get('windows', q['windows'])} x {row.get('seq', q.get('seq', 8192)):,}"
        versus_own = "" if form == float_form else _delta(row["loss"], own)
        lines.append(f"| {arm.removesuffix(tag)} | {form} | {where} | {row['loss']:.4f} | "
                     f"{row['bits_per_byte']:.4f} | {_delta(row['loss'], control)} | {versus_own} |")
    return lines


def _delta(loss: float, reference: float | None) -> str:
    return "no float row on these tokens" if reference is None else f"{loss - reference:+.4f}"


def _rope_label(variant: dict[str, Any], length: int) -> str:
    context = variant.get("context", length)
    if variant["rope_scaling"] is not None:
        return f"YaRN x{variant['rope_scaling']['factor']:g}"
    return "plain RoPE" if context == length else f"plain RoPE, {_k(context)} pieces"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plots(results: Path, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: tables only (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    config = yaml.safe_load((ROOT / "configs/study/train.yaml").read_text())
    step_tokens = tokens_per_step([], config)
    runs = {n: curves(read_metrics(results / f"{n}.metrics.jsonl"), step_tokens)
            for n in LABELS if (results / f"{n}.metrics.jsonl").exists()}
    written = []
    for x, xlabel, fname in (("val_tokens", "tokens seen (millions)", "study_loss_vs_tokens.png"),
                             ("val_seconds", "training time on one H200 (minutes)", "study_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for name, c in runs.items():
            if x == "val_seconds" and name in SIDE_BY_SIDE:
                continue
            scale = 1e6 if x == "val_tokens" else 60.0
            ax.plot([v / scale for v in c[x]], c["val_loss"], marker=".", label=LABELS[name])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written.append(out / fname)
    loads = {n: read_metrics(results / f"{n}.metrics.jsonl") for n in ("hybrid-soft", "hybrid-topk")
             if (results / f"{n}.metrics.jsonl").exists()}
    if loads:
        fig, axes = plt.subplots(1, len(loads), figsize=(6.4 * len(loads) / 1.3, 4.0), dpi=110, squeeze=False)
        for ax, (name, records) in zip(axes[0], loads.items(), strict=True):
            rows = [r for r in records if "expert_load" in r]
            for e in range(len(rows[0]["expert_load"]) if rows else 0):
                ax.plot([r["step"] * step_tokens / 1e6 for r in rows], [r["expert_load"][e] for r in rows],
                        label=f"expert {e}")
            ax.set_title(LABELS[name], fontsize=9)
            ax.set_xlabel("tokens seen (millions)")
            ax.set_ylabel("share of routed load (mean over layers)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "study_expert_load.png")
        plt.close(fig)
        written.append(out / "study_expert_load.png")
    for name, path in measured_from(results, "longctx"):
        suffix = "" if name == "hybrid-soft" else f".{name}"
        written.append(_long_context_plot(plt, json.loads(path.read_text()), name,
                                          out / f"study_long_context{suffix}.png"))
    return written


def _long_context_plot(plt, lc: dict[str, Any], name: str, path: Path) -> Path:
    # top: the curves (the text at each position varies, so they wander together); bottom: each curve
    # minus plain RoPE on the same tokens, which is what YaRN (or the shorter context) changes
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    base = lc["variants"].get("rope", {}).get("curve_256")
    for v in lc["variants"].values():
        x = [(i + 0.5) * 256 / 1024 for i in range(len(v["curve_256"]))]
        (line,) = top.plot(x, v["curve_256"], label=_rope_label(v, lc["length"]), lw=1)
        if base is not None and v["curve_256"] is not base:  # in the same colour as its curve above
            bottom.plot(x, [a - b for a, b in zip(v["curve_256"], base, strict=True)], lw=1,
                        color=line.get_color(), label=_rope_label(v, lc["length"]) + " − plain RoPE")
    for ax in (top, bottom):
        ax.axvline(lc["trained_seq_len"] / 1024, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_title(LABELS[name], fontsize=9)
    top.set_ylabel("held-out loss (256-token means)")
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel("difference (nats)")
    bottom.set_xlabel("position in the window (k tokens); dashed: the training length")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    written = plots(results, out)
    block = tables(results)
    doc = ROOT / "docs/results.md"
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: the study markers are missing; add\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    sys.path.insert(0, str(ROOT / "src"))
    from mamba_moe.atomic import atomic_write

    atomic_write(doc, f"{head}{BEGIN}\n{block}{END}{tail}")
    print(block)
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in [*written, doc]))


if __name__ == "__main__":
    write_report(ROOT / "docs/results/study", ROOT / "docs/results")
