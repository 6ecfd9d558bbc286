"""CPU benchmarks of the whole model: training-step throughput and decode-state size.

    python bench/cpu_model.py                                   # defaults, prints markdown
    python bench/cpu_model.py --presets mamba-moe-small --repeats 10
    python bench/cpu_model.py --shape mamba-r1=2x128             # batch x seq for one preset
    python bench/cpu_model.py --append docs/benchmarks.md        # also append a dated section
    python bench/cpu_model.py --profile                          # + top ops of one step per preset

Tables printed:
1. Training step (fp32, forward + backward of loss + aux_loss, no optimizer step): median, min and max
   tokens/s over ``--repeats`` timed steps after ``--warmup`` untimed ones.
2. Decode state of ``--state-preset`` measured: a real prefill of N tokens (batch 1) through the model
   with a cache, then ``cache.state_bytes()``; the analytic formula of table 3 is checked against it.
3. Decode state of the flagship (``mamba-moe-300m``) computed from its config alone, per sequence:
   Mamba layer: conv_dim * (K - 1) * dtype bytes + heads * head_dim * d_state * 4 (the SSM state is
   kept in fp32 even for bf16 models); attention layer: (k_heads * head_dim + kv_heads * value_dim)
   * dtype bytes per token.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _machine import append_markdown, cpu_name  # bench/_machine.py, beside this script

from mamba_moe.config import MambaMoEConfig, get_preset
from mamba_moe.model.lm import MambaMoEForCausalLM

DEFAULT_PRESETS = ["mamba-moe-tiny", "mamba-moe-small", "mamba-r1"]
# batch x seq per preset, chosen so the default run stays within a few minutes on 2 cores.
DEFAULT_SHAPES = {
    "mamba-moe-tiny": (8, 128),
    "mamba-moe-small": (4, 256),
    "mamba-r1": (1, 256),
    "mamba-moe-300m": (1, 128),
}
FALLBACK_SHAPE = (1, 128)
FLAGSHIP = "mamba-moe-300m"


# ---- environment ------------------------------------------------------------------------------------

def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               check=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "none (no commit)"


def environment_lines(command: str) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- device: CPU, {cpu_name()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}",
        f"- git: {git_revision()}",
        f"- load average (1 min) at start: {os.getloadavg()[0]:.2f}",
        f"- command: `{command}`",
    ]


# ---- formatting ---------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; align has one 'l' or 'r' per column."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


# ---- 1. training step ---------------------------------------------------------------------------------

def bench_train(name: str, batch: int, seq: int, warmup: int, repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    config = get_preset(name)
    seq = min(seq, config.max_position_embeddings)
    model = MambaMoEForCausalLM(config).float().train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))

    def step() -> float:
        start = time.perf_counter()
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    for _ in range(warmup):
        step()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    times = [step() for _ in range(repeats)]
    # CPU seconds of this process per wall second: about the thread count when it had the cores to
    # itself, clearly less when other processes competed for them.
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    tokens = batch * seq
    rates = [tokens / t for t in times]
    return {
        "name": name, "batch": batch, "seq": seq,
        "total": model.num_parameters(), "active": model.num_parameters(active=True),
        "median_tps": statistics.median(rates), "min_tps": min(rates), "max_tps": max(rates),
        "median_s": statistics.median(times), "cpu_util": cpu_util, "model": model, "ids": ids,
    }


def starved(result: dict) -> bool:
    """True when the process got clearly less CPU than its threads could use: other jobs took the cores."""
    return result["cpu_util"] < 0.75 * torch.get_num_threads()


def train_table(results: list[dict], warmup: int, repeats: int) -> str:
    rows = [[f"`{r['name']}`", human_count(r["total"]), human_count(r["active"]),
             f"{r['batch']} x {r['seq']}", f"**{r['median_tps']:,.0f}**", f"{r['min_tps']:,.0f}",
             f"{r['max_tps']:,.0f}", f"{r['median_s']:.3f}",
             f"{r['cpu_util']:.2f}" + (" (**shared**)" if starved(r) else "")] for r in results]
    head = ["preset", "params", "active", "batch x seq", "tokens/s (median)", "min", "max", "step s (median)",
            "cpu/wall"]
    note = (f"Training step on CPU, fp32: forward + backward of loss + aux_loss (no optimizer step); "
            f"{warmup} warm-up step(s), then median / min / max over {repeats} timed steps. cpu/wall: CPU "
            f"seconds of the process per wall second while timing, about {torch.get_num_threads()} (the "
            f"threads) on an otherwise idle machine; rows marked shared had clearly less, so other processes "
            f"took the cores and their timings are too slow.")
    return note + "\n\n" + table(head, rows, "lrrlrrrrr")


def profile_step(result: dict, top: int) -> str:
    """Top ops (self CPU time) of one training step of an already warmed-up model."""
    from torch.profiler import ProfilerActivity, profile

    model, ids = result["model"], result["ids"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=30, max_shapes_column_width=80)
    return f"### profile of one step: {result['name']}\n\n{by_op}\n{by_shape}"


# ---- 2. decode state, measured ------------------------------------------------------------------------

@torch.no_grad()
def measure_state(name: str, contexts: list[int], seed: int, prefill_chunk: int) -> list[dict]:
    torch.manual_seed(seed)
    config = get_preset(name)
    model = MambaMoEForCausalLM(config).float().eval()
    rows = []
    for n in contexts:
        if n > config.max_position_embeddings:
            print(f"[skip] {name}: context {n} > max_position_embeddings {config.max_position_embeddings}",
                  file=sys.stderr)
            continue
        cache = model.new_cache(1)
        ids = torch.randint(0, config.vocab_size, (1, n))
        start = time.perf_counter()
        for i in range(0, n, prefill_chunk):
            model(ids[:, i:i + prefill_chunk], cache=cache)
        elapsed = time.perf_counter() - start
        assert cache.seen_tokens == n, (cache.seen_tokens, n)
        measured = cache.state_bytes()
        allocated = measured["mamba"] + sum(kv_allocated_bytes(s) for s in cache.layers if hasattr(s, "key"))
        predicted = analytic_state(config, n, dtype_bytes=4)
        rows.append({"context": n, **measured, "allocated": allocated, "prefill_s": elapsed,
                     "matches": (measured["mamba"], measured["attention"]) ==
                                (predicted["mamba"], predicted["attention"])})
    return rows


def kv_allocated_bytes(state) -> int:
    """Bytes a KV state holds, including preallocated room past the filled positions (if it keeps any)."""
    key_buffer, value_buffer = getattr(state, "_key_buffer", None), getattr(state, "_value_buffer", None)
    if key_buffer is None or value_buffer is None:
        return state.key.nbytes + state.value.nbytes
    return key_buffer.nbytes + value_buffer.nbytes


def state_table(name: str, config: MambaMoEConfig, rows: list[dict], prefill_chunk: int) -> str:
    out = [[f"{r['context']:,}", human_bytes(r["mamba"]), human_bytes(r["attention"]),
            human_bytes(r["total"]), human_bytes(r["allocated"]), f"{r['prefill_s']:.2f}",
            "yes" if r["matches"] else "**NO**"] for r in rows]
    n_mamba, n_attn = config.layer_mixers.count("mamba"), config.layer_mixers.count("attention")
    note = (f"Decode state of `{name}` ({n_mamba} Mamba + {n_attn} attention layers), fp32, batch 1, "
            f"measured: `cache.state_bytes()` after a real prefill of N tokens (in chunks of "
            f"{prefill_chunk}). allocated: Mamba state plus the KV buffers including their unused "
            f"preallocated room; last column: the Mamba and KV bytes equal the formula used for the flagship "
            f"below.")
    head = ["context N", "Mamba state", "attention KV", "total", "allocated", "prefill s", "= formula"]
    return note + "\n\n" + table(head, out, "rrrrrrl")


# ---- 3. decode state, analytic -----------------------------------------------------------------------

def analytic_state(config: MambaMoEConfig, context: int, dtype_bytes: int, batch: int = 1) -> dict[str, int]:
    """Bytes of HybridCache for ``batch`` sequences of ``context`` tokens, from the config alone."""
    conv = config.ssm_conv_dim * (config.ssm_conv_kernel - 1) * dtype_bytes
    ssm = config.ssm_num_heads * config.ssm_head_dim * config.ssm_state_size * 4  # fp32 always (mamba2.py)
    diff = config.attn_type == "diff"
    k_heads = 2 * config.attn_num_kv_heads if diff else config.attn_num_kv_heads
    value_dim = 2 * config.head_dim if diff else config.head_dim
    per_token = (k_heads * config.head_dim + config.attn_num_kv_heads * value_dim) * dtype_bytes
    mamba = config.layer_mixers.count("mamba") * (conv + ssm) * batch
    attention = config.layer_mixers.count("attention") * per_token * context * batch
    return {"mamba": mamba, "attention": attention, "total": mamba + attention, "kv_per_token": per_token}


def flagship_table(contexts: list[int]) -> str:
    config = get_preset(FLAGSHIP)
    rows = []
    for dtype, nbytes in (("bf16", 2), ("fp32", 4)):
        for n in contexts:
            s = analytic_state(config, n, nbytes)
            rows.append([f"{n:,}", dtype, human_bytes(s["mamba"]), human_bytes(s["attention"]),
                         human_bytes(s["total"]), f"{100 * s['attention'] / s['total']:.0f}%"])
    n_mamba, n_attn = config.layer_mixers.count("mamba"), config.layer_mixers.count("attention")
    per_tok = {d: analytic_state(config, 1, b)["kv_per_token"] * n_attn
               for d, b in (("bf16", 2), ("fp32", 4))}
    note = (f"Decode state of the flagship `{FLAGSHIP}` ({n_mamba} Mamba + {n_attn} {config.attn_type} "
            f"attention layers, {config.attn_num_kv_heads} KV head(s) x {config.head_dim}), per sequence, "
            f"computed from the config: the Mamba part is constant (its SSM state is fp32 in either dtype, "
            f"only the conv window follows the dtype); the KV cache grows by {per_tok['bf16']:,} B/token "
            f"in bf16, {per_tok['fp32']:,} B/token in fp32.")
    head = ["context", "dtype", "Mamba state", "attention KV", "total", "KV share"]
    return note + "\n\n" + table(head, rows, "rlrrrr")


# ---- main -----------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[str, tuple[int, int]]:
    try:
        name, dims = text.split("=")
        batch, seq = (int(v) for v in dims.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--shape: expected PRESET=BATCHxSEQ, got {text!r}") from err
    return name, (batch, seq)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS,
                        help="presets for the training table")
    parser.add_argument("--shape", type=parse_shape, action="append", default=[], metavar="PRESET=BxS",
                        help=f"batch x seq for one preset (repeatable); defaults: "
                             f"{', '.join(f'{k}={b}x{s}' for k, (b, s) in DEFAULT_SHAPES.items())}")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per preset")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--state-preset", default="mamba-moe-small",
                        help="preset whose decode state is measured")
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 256, 1024, 4096],
                        help="prefill lengths for the measured state table")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill call")
    parser.add_argument("--flagship-contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also print the top ops of one step per preset")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--append", type=Path, metavar="FILE",
                        help="append a dated section to this markdown file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.prefill_chunk < 1:
        parser.error("--repeats and --prefill-chunk must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    shapes = {**DEFAULT_SHAPES, **dict(args.shape)}
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if argv is None else "bench/cpu_model.py",
                                      *(sys.argv[1:] if argv is None else argv)])
    env = environment_lines(command)
    print("\n".join(env) + "\n", flush=True)

    results, profiles = [], []
    for name in args.presets:
        batch, seq = shapes.get(name, FALLBACK_SHAPE)
        print(f"[train] {name} {batch}x{seq} ...", file=sys.stderr, flush=True)
        result = bench_train(name, batch, seq, args.warmup, args.repeats, args.seed)
        if args.profile:
            profiles.append(profile_step(result, args.profile_top))
        result.pop("model"), result.pop("ids")
        results.append(result)
    sections = [train_table(results, args.warmup, args.repeats)]

    print(f"[state] {args.state_preset} prefill {args.contexts} ...", file=sys.stderr, flush=True)
    state_rows = measure_state(args.state_preset, args.contexts, args.seed, args.prefill_chunk)
    state_config = get_preset(args.state_preset)
    sections.append(state_table(args.state_preset, state_config, state_rows, args.prefill_chunk))
    sections.append(flagship_table(args.flagship_contexts))

    load_line = f"- load average (1 min) at end: {os.getloadavg()[0]:.2f}"
    # The load average lags and counts our own threads; cpu/wall while timing is the direct sign.
    shared = [r["name"] for r in results if starved(r)]
    if shared:
        load_line += f" (**other processes competed for the cores while timing {', '.join(shared)}**)"
    env.append(load_line)
    body = "\n\n".join(sections)
    print(load_line + "\n\n" + body)
    for text in profiles:
        print("\n" + text)

    if args.append is not None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        append_markdown(str(args.append), f"## CPU model benchmarks, {stamp}\n\n" + "\n".join(env) + "\n\n"
                        + body + "\n")
        print(f"\nappended to {args.append}", file=sys.stderr)
    return 0 if all(r["matches"] for r in state_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
