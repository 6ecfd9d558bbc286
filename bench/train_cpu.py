"""CPU training throughput (tokens/s) of the demo config: median of repeats, per thread count.

    python bench/train_cpu.py [--config configs/train/demo.yaml] [--steps 8] [--repeats 3] [--threads 1 2]
                              [--append docs/training.md]

Each repeat times ``--steps`` optimizer steps (forward, backward, clip, AdamW) after one warm-up step, on
real batches from the prepared stdlib shards. Prints a markdown table with the device, date and command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from _machine import append_markdown, cpu_name

from mamba_moe.training import TrainConfig, Trainer


def measure(cfg: TrainConfig, threads: int, steps: int, repeats: int) -> list[float]:
    cfg.threads = threads
    trainer = Trainer(cfg, log=lambda _: None).setup()
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    trainer.train_step()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        rates.append(steps * tokens / (time.perf_counter() - start))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train/demo.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.load(args.config, [f"output={tmp}", "progress=false", "max_steps=100000"])
        load_before = os.getloadavg()[0]
        rows = []
        for threads in dict.fromkeys(args.threads):
            rates = measure(cfg, threads, args.steps, args.repeats)
            rows.append((threads, statistics.median(rates), min(rates), max(rates)))
        load_after = os.getloadavg()[0]
    model = cfg.model.build()
    lines = [
        "### CPU training throughput (demo config)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- device: CPU, {cpu_name()}, {os.cpu_count()} logical cores; load average (1 min) "
        f"{load_before:.2f} before, {load_after:.2f} after",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
        f"- config: {args.config} (d_model {model.d_model}, {model.n_layers} layers, vocab {model.vocab_size}; "
        f"seq_len {cfg.seq_len} x batch {cfg.batch_size} x accum {cfg.grad_accum} = "
        f"{cfg.seq_len * cfg.batch_size * cfg.grad_accum} tokens/step, fp32)",
        f"- {args.steps} steps per repeat after 1 warm-up step; median of {args.repeats} repeats",
        f"- command: `python {' '.join(sys.argv)}`",
        "",
        "| torch threads | tokens/s (median) | min | max | s/step (median) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    tokens = cfg.seq_len * cfg.batch_size * cfg.grad_accum
    lines += [f"| {t} | {med:,.0f} | {lo:,.0f} | {hi:,.0f} | {tokens / med:.2f} |" for t, med, lo, hi in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
