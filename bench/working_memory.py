"""Working memory: a chat turn on the kept state (only the new tokens fed) vs re-reading the transcript.

    python bench/working_memory.py                                    # mamba-moe-tiny, 1 thread
    python bench/working_memory.py --preset mamba-moe-small --history 256 1024 2048 --threads 2
    python bench/working_memory.py --append docs/benchmarks.md

For each history length T: a random-weight preset, a transcript of T random ids and a new turn of
``--turn-tokens`` ids. "kept" is ``Engine.request(turn, cache=state)`` (what ``memory/working.py`` does each
turn), "re-read" is ``Engine.request(transcript + turn)`` (what a stateless chat does); both are timed to the
first token (prefill + one sample), median over ``--repeats``, plus the clone of the kept state (the
per-turn snapshot). Speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time

import torch
from _machine import append_markdown, cpu_name

from mamba_moe.config import get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.model.lm import MambaMoEForCausalLM

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def first_token_s(engine: Engine, prompt: list[int], cache=None) -> tuple[float, object]:
    start = time.perf_counter()
    request = engine.request(prompt, ONE, cache=cache, keep_cache=True)
    for _ in engine.run([request]):
        pass
    return time.perf_counter() - start, request.final_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mamba-moe-tiny")
    parser.add_argument("--history", type=int, nargs="+", default=[128, 512, 1536])
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", help="also append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    context = max(args.history) + args.turn_tokens + 8
    model = MambaMoEForCausalLM(get_preset(args.preset, max_position_embeddings=context)).eval()
    engine = Engine(model)
    vocab = model.config.vocab_size
    rows = ["| history tokens | kept state: turn TTFT ms | re-read: turn TTFT ms | speed-up | snapshot clone ms | "
            "state MB |", "|---:|---:|---:|---:|---:|---:|"]
    for history in args.history:
        transcript = torch.randint(4, vocab, (history,)).tolist()
        turn = torch.randint(4, vocab, (args.turn_tokens,)).tolist()
        _, state = first_token_s(engine, transcript)
        kept, reread, clone = [], [], []
        for _ in range(args.repeats + 1):                       # the first of each is a warm-up
            t0 = time.perf_counter()
            copy = state.clone()
            clone.append(time.perf_counter() - t0)
            kept.append(first_token_s(engine, turn, copy)[0])
            reread.append(first_token_s(engine, transcript + turn)[0])
        k, r, c = (statistics.median(x[1:]) * 1e3 for x in (kept, reread, clone))
        mb = state.state_bytes()["total"] / 2**20
        rows.append(f"| {history} | {k:.1f} | {r:.1f} | {r / k:.1f}x | {c:.2f} | {mb:.2f} |")
    table = "\n".join(rows)
    head = (f"working memory, {args.preset}, {args.threads} thread(s), turn of {args.turn_tokens} tokens, "
            f"{cpu_name()}, torch {torch.__version__}, {platform.python_version()}, "
            f"{datetime.date.today()}\n`{shlex.join(['python', *sys.argv])}`\n\n")
    print(head + table)
    if args.append:
        append_markdown(args.append, "### Working memory: kept state vs re-reading\n\n" + head + table + "\n")


if __name__ == "__main__":
    main()
