"""Decode speed of the generation engine: time to first token and tokens/s, per preset.

    python bench/decode_speed.py                                        # tiny, small, 300m; batch 1; CPU
    python bench/decode_speed.py --presets mamba-moe-300m --new-tokens 32 --repeats 3
    python bench/decode_speed.py --threads 1 2 --batch 1 4              # one row per combination
    python bench/decode_speed.py --profile mamba-moe-300m               # + the ops that dominate a decode step
    python bench/decode_speed.py --quantize none int8                   # + experimental int8 CPU weights
    python bench/decode_speed.py --decoders model fast fast-int8         # decode step: reference / fused / int8
    python bench/decode_speed.py --device cuda --dtype bfloat16 --decoders model cuda-graphs --batch 1 8 32 64
    python bench/decode_speed.py --append docs/benchmarks.md            # also append a dated section

Each measurement builds the preset with random weights (speed does not depend on their values), runs
``Engine.run`` on ``batch`` random prompts of ``--prompt-tokens`` tokens with greedy decoding and end
tokens ignored, and reports medians over ``--repeats`` runs after one warm-up:

- TTFT: from submitting the prompts to the first token of every row (chunked prefill + one sample);
- decode tok/s: tokens after the first, divided by the time after the first (all rows together);
- ms/step: one decode step; weight GB/s: the active weights' bytes read per step / step time, which
  shows how close a step is to the memory-bandwidth bound of a batch-1 decode.

On a machine shared with other work, the median says what a user saw and the best run (also shown)
what the hardware does when left alone; the load average before and after is printed with the table.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import shlex
import statistics
import sys
import time

import torch
from _machine import append_markdown, cpu_name

from mamba_moe.config import get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.core.request import Request
from mamba_moe.inference.decoders.quantize import quantize_int8
from mamba_moe.model.lm import MambaMoEForCausalLM

DEFAULT_PRESETS = ["mamba-moe-tiny", "mamba-moe-small", "mamba-moe-300m"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU, {torch.cuda.get_device_name(device)}"
    return f"CPU, {cpu_name()}, {os.cpu_count()} logical cores"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def model_active_params(preset: str) -> int:
    with torch.device("meta"):
        return MambaMoEForCausalLM(get_preset(preset)).num_parameters(active=True)


def run_once(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, float, int]:
    """(TTFT s, decode s after the first token, tokens decoded after the first) for one batched generation."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    requests = [engine.request(p, params) for p in prompts]
    sync(device)
    start = time.perf_counter()
    first, seen = None, 0
    for _ in engine.run(requests):
        seen += 1
        if seen == len(prompts):
            sync(device)
            first = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    return first - start, end - first, seen - len(prompts)


_MODELS: dict[tuple[str, str], MambaMoEForCausalLM] = {}


def build_model(preset: str, args: argparse.Namespace) -> MambaMoEForCausalLM:
    """The preset with random weights (seeded), cached across rows unless it is quantized in place."""
    key = (preset, args.dtype)
    if key in _MODELS and not args.int8:
        return _MODELS[key]
    torch.manual_seed(args.seed)
    model = MambaMoEForCausalLM(get_preset(preset)).to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    if args.int8:
        return quantize_int8(model)
    _MODELS.clear()
    _MODELS[key] = model
    return model


def measure(preset: str, batch: int, threads: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    model = build_model(preset, args)
    torch.manual_seed(args.seed)
    engine = Engine(model, prefill_chunk=args.prefill_chunk, max_batch=batch, decoder=args.decoder,
                    max_context=args.prompt_tokens + args.new_tokens + 8)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,)).tolist() for _ in range(batch)]
    run_once(engine, [p[:8] for p in prompts], 3, args.device)                       # warm-up
    runs = [run_once(engine, prompts, args.new_tokens, args.device) for _ in range(args.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    rate = statistics.median(r[2] / r[1] for r in runs)
    best = max(r[2] / r[1] for r in runs)
    step_s = batch / best
    int8 = args.int8 or args.decoder == "fast-int8"
    weight_bytes = model_active_params(preset) * (1 if int8 else torch.finfo(dtype).bits // 8)
    return {"preset": preset, "weights": "int8" if int8 else args.dtype, "decoder": args.decoder,
            "batch": batch, "threads": threads,
            "new": args.new_tokens, "ttft_ms": ttft * 1e3, "best_ttft_ms": min(r[0] for r in runs) * 1e3, "best": best,
            "prefill": batch * args.prompt_tokens / ttft, "rate": rate, "ms_step": step_s * 1e3,
            "gbps": weight_bytes / step_s / 1e9, "params": model_active_params(preset), "engine": engine,
            "prompts": prompts}


def profile(result: dict, steps: int, top: int, device: str) -> str:
    """The ops that dominate ``steps`` decode steps of a batch-1 generation (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine: Engine = result["engine"]
    from mamba_moe.inference.core.batch import DecodeBatch

    batch = DecodeBatch(engine.model, engine.prefill_chunk, engine.decoder)
    request = Request(result["prompts"][0], SamplingParams(max_tokens=steps + 10, temperature=0),
                      vocab_size=engine.model.config.vocab_size)
    batch.add([request])
    batch.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            batch.step()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=top,
                                                                 max_name_column_width=40, max_shapes_column_width=60)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        matmuls = ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "quantized::linear_dynamic")
        kind = ("matmul (weights, SSM state)" if event.key in matmuls
                else "attention" if "scaled_dot_product" in event.key or "flash" in event.key
                else "elementwise / reductions" if event.key in ("aten::mul", "aten::add", "aten::sum", "aten::exp",
                                                                 "aten::silu", "aten::softmax", "aten::_softmax",
                                                                 "aten::pow", "aten::mean", "aten::rsqrt",
                                                                 "aten::div", "aten::sub", "aten::logsumexp",
                                                                 "aten::softplus", "aten::cumsum", "aten::where")
                else "copies / casts / other")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    shares = "\n".join(f"- {k}: {v / whole:.0%} of self CPU time ({v / 1e3 / steps:.1f} ms/step)"
                       for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    title = (f"### Profile: {result['preset']} ({result['weights']} weights, decoder {result['decoder']}), "
             f"{steps} decode steps, batch 1")
    return f"{title}\n\n{shares}\n\n```\n{table}\n```\n"


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## Decode speed ({now})",
        "",
        f"- device: {device_name(args.device)}; dtype {args.dtype}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.2f} (a shared machine slows every number)",
        f"- prompt {args.prompt_tokens} random tokens per row, greedy, prefill chunk "
        f"{args.prefill_chunk}, median of {args.repeats}",
        f"- command: `{command}`",
        "",
        "| preset | active params | weights | decoder | batch | threads | new tokens | TTFT ms median (best) "
        "| prefill tok/s | decode tok/s median (best) | ms/step (best) | weight GB/s (best) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['weights']} | {r['decoder']} | {r['batch']} "
                     f"| {r['threads']} | "
                     f"{r['new']} | "
                     f"{r['ttft_ms']:.0f} ({r['best_ttft_ms']:.0f}) | {r['prefill']:.0f} | {r['rate']:.1f} "
                     f"({r['best']:.1f}) | {r['ms_step']:.1f} | {r['gbps']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--new-tokens-300m", type=int, default=16, help="new tokens for mamba-moe-300m (slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", nargs="+", choices=["none", "int8"], default=["none"],
                        help="weight formats to measure (int8: experimental CPU int8 decoding)")
    parser.add_argument("--decoders", nargs="+", choices=list(Engine.DECODERS), default=["model"],
                        help="decode steps to measure: the model's forward (reference), the fused step, "
                             "the fused step with int8 weights (CPU), the fused step in CUDA graphs (GPU)")
    parser.add_argument("--profile", nargs="*", default=None, metavar="PRESET",
                        help="profile decode steps of these presets (all measured ones if none named)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--append", help="also append the markdown to this file")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    results, profiles = [], []
    for preset in args.presets:
        new_tokens = args.new_tokens_300m if preset == "mamba-moe-300m" else args.new_tokens
        combos = itertools.product(args.threads, args.batch, args.quantize, args.decoders)
        for threads, batch, quant, decoder in combos:
            if quant == "int8" and decoder != "model":
                continue  # the fast decoders make their own int8 weights (fast-int8)
            run_args = argparse.Namespace(**{**vars(args), "new_tokens": new_tokens, "int8": quant == "int8",
                                             "decoder": decoder})
            result = measure(preset, batch, threads, run_args)
            print(f"{preset} {result['weights']} {decoder} batch {batch} threads {threads}: TTFT "
                  f"{result['ttft_ms']:.0f} ms, {result['rate']:.1f} tok/s", file=sys.stderr, flush=True)
            wanted = args.profile is not None and (not args.profile or preset in args.profile)
            last = (args.batch[0], args.threads[-1], args.quantize[-1], args.decoders[-1])
            if wanted and (batch, threads, quant, decoder) == last:
                profiles.append(profile(result, args.profile_steps, 15, args.device))
            del result["engine"], result["prompts"]
            results.append(result)
    text = markdown(results, args, command) + f"\n- load average at the end: {os.getloadavg()[0]:.2f}\n"
    text += "".join("\n" + p for p in profiles)
    print(text)
    if args.append:
        append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
