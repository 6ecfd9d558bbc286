"""Decode speed of two source trees, A/B, in one run: is a change to the decode path faster or slower?

    git archive <commit> src | tar -x -C /tmp/base                    # the baseline's sources
    python bench/decode_ab.py --baseline /tmp/base/src --presets mamba-moe-300m --decoders fast fast-int8
    python bench/decode_ab.py --baseline /tmp/base/src --device cuda --dtype bfloat16 --decoders cuda-graphs

Each measurement is a fresh subprocess with ``PYTHONPATH`` set to one tree (so the two never share a
process), building the preset with seeded random weights and timing ``Engine.run`` on one prompt with greedy
decoding: decode tok/s counts the tokens after the first over the time after the first. The trees alternate
(A B B A A B ...) so slow drift of a shared machine falls on both; the table gives each side's median and
the ratio of medians (current / baseline; > 1 is faster). Only the public ``Engine`` API is used, so any two
versions that have it can be compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from _machine import append_markdown

MEASURE = r"""
import json, sys, time, torch
from mamba_moe.config import get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.model.lm import MambaMoEForCausalLM
preset, decoder, device, dtype, threads, prompt_tokens, new_tokens, seed = sys.argv[1:9]
torch.set_num_threads(int(threads))
torch.manual_seed(int(seed))
model = MambaMoEForCausalLM(get_preset(preset)).to(device=device, dtype=getattr(torch, dtype)).eval()
engine = Engine(model, decoder=decoder, max_batch=1, max_context=int(prompt_tokens) + int(new_tokens) + 8)
prompt = torch.randint(4, model.config.vocab_size, (int(prompt_tokens),)).tolist()
params = SamplingParams(max_tokens=int(new_tokens), temperature=0, ignore_eos=True)
def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
rates = []
for _ in range(2):  # the first run warms up (graph capture, lazy initialisation)
    sync(); first = None; seen = 0
    for _ in engine.run([engine.request(prompt, params)]):
        seen += 1
        if seen == 1:
            sync(); first = time.perf_counter()
    sync()
    rates.append((seen - 1) / (time.perf_counter() - first))
print(json.dumps({"tok_s": rates[-1]}))
"""


def measure(tree: str, preset: str, decoder: str, args: argparse.Namespace) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-c", MEASURE, preset, decoder, args.device, args.dtype, str(args.threads),
           str(args.prompt_tokens), str(args.new_tokens), str(args.seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {preset} {decoder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the baseline tree's src directory")
    parser.add_argument("--current", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--presets", nargs="+", default=["mamba-moe-300m"])
    parser.add_argument("--decoders", nargs="+", default=["fast", "fast-int8"])
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs per row (alternating order)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", help="also append the markdown table to this file")
    args = parser.parse_args()

    rows = []
    for preset in args.presets:
        for decoder in args.decoders:
            runs: dict[str, list[float]] = {"baseline": [], "current": []}
            for i in range(args.pairs):
                order = ("baseline", "current") if i % 2 == 0 else ("current", "baseline")
                for side in order:
                    tree = args.baseline if side == "baseline" else args.current
                    runs[side].append(measure(tree, preset, decoder, args))
            base, cur = statistics.median(runs["baseline"]), statistics.median(runs["current"])
            rows.append((preset, decoder, base, cur, cur / base, runs))
            print(f"{preset} {decoder}: baseline {base:.2f} current {cur:.2f} tok/s (x{cur / base:.3f})", flush=True)

    lines = [f"### Decode A/B ({datetime.date.today().isoformat()})", "",
             f"`python bench/decode_ab.py {shlex.join(sys.argv[1:])}`", "",
             f"Device: {args.device} ({platform.processor() or platform.machine()}), {args.threads} thread(s), "
             f"{args.dtype}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
             f"{args.pairs} alternating pairs.",
             "", "| preset | decoder | baseline tok/s (median) | current tok/s (median) | current / baseline |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {p} | {d} | {b:.2f} | {c:.2f} | {r:.3f} |" for p, d, b, c, r, _ in rows]
    lines += ["", "Every run (baseline; current): " + "; ".join(
        f"{p} {d}: " + ", ".join(f"{x:.2f}" for x in runs["baseline"]) + "; " + ", ".join(
            f"{x:.2f}" for x in runs["current"]) for p, d, _, _, _, runs in rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
