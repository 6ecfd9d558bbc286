"""How fast llama.cpp (through llama-cpp-python) runs a GGUF file on this machine's CPU: prefill, and decode at
several context lengths.

    python -m mamba_moe.export.llama_speed model-q4_k_m.gguf --threads 1 2 --contexts 512 2048 8192

For each context length C (ascending) the context is prefilled with random ids up to C tokens (continuing
from the previous C, in batches of 512; the prefill rate of that segment is reported), and llama.cpp's
state is saved. Then for each thread count, ``repeats + 1`` times: the state is restored (so every run
starts from exactly C tokens) and ``new_tokens`` greedy tokens are decoded one ``eval`` each; the first run
warms up and is not counted, the median of the others is the decode rate. The 1-minute load average is
read after each row: on a shared machine it says how much of the CPU the measurement had.

Indicative for the machine it runs on, not a phone's (``docs/deployment.md`` works a phone's out).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .llama_quant import captured_native_output, import_llama_cpp

PREFILL_BATCH = 512
# llama.cpp's KV-cache element types by the names its CLI takes (-ctk/-ctv); a quantized V cache needs flash
# attention in llama.cpp, so anything but f16 asks for it
CACHE_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}


@dataclass
class SpeedRow:
    """One (context, threads) measurement of one file."""

    path: Path
    context: int              # tokens in the context when each timed decode starts
    threads: int
    prefill_tok_s: float      # prefilling the segment that ended at ``context`` (with the most threads asked)
    prefill_from: int         # ... which started at this many tokens
    new_tokens: int
    decode_tok_s: list[float]  # one per counted run
    load_1min: float          # os.getloadavg()[0] right after the row

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def mib(self) -> float:
        """Size of what is measured, in MiB (the file)."""
        return self.path.stat().st_size / 2**20

    def summary(self) -> str:
        return (f"{self.name}: {self.mib:.1f} MiB, context {self.context}, "
                f"{self.threads} thread(s): decode {self.decode_median:.1f} tok/s (median of "
                f"{len(self.decode_tok_s)} runs of {self.new_tokens} tokens; all: "
                f"{', '.join(f'{v:.1f}' for v in self.decode_tok_s)}), prefill {self.prefill_from}->"
                f"{self.context}: {self.prefill_tok_s:.1f} tok/s, load {self.load_1min:.2f}")


def _argmax_of_last_logits(llama_cpp, llm) -> int:
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


class _SavedState:
    """llama.cpp's context state (KV cache, Mamba2 conv/SSM states), to decode from the same point more than
    once: a recurrent state cannot be cut back to a shorter prefix. The state llama.cpp restores does not
    give back the last logits as ``llama_get_logits_ith(-1)`` reads them (tested), so the greedy token they
    pick is kept here."""

    def __init__(self, llama_cpp, llm) -> None:
        self._llama_cpp, self._ctx, self.n_tokens = llama_cpp, llm._ctx.ctx, llm.n_tokens
        self.next_token = _argmax_of_last_logits(llama_cpp, llm)
        size = llama_cpp.llama_state_get_size(self._ctx)
        self._data = (ctypes.c_uint8 * size)()
        self._size = llama_cpp.llama_state_get_data(self._ctx, self._data, size)

    def restore(self, llm) -> None:
        if self._llama_cpp.llama_state_set_data(self._ctx, self._data, self._size) != self._size:
            raise RuntimeError("llama.cpp refused to restore its saved state")
        llm.n_tokens = self.n_tokens


def _greedy_decode(llama_cpp, llm, first: int, n: int, chosen: list[int] | None = None) -> float:
    """Seconds to decode ``n`` tokens greedily, one ``eval`` each: ``first``, then each the argmax of
    llama.cpp's last logits. ``chosen`` collects the tokens fed."""
    token = first
    start = time.perf_counter()
    for _ in range(n):
        if chosen is not None:
            chosen.append(token)
        llm.eval([token])
        token = _argmax_of_last_logits(llama_cpp, llm)
    return time.perf_counter() - start


def measure(path: str | Path, contexts: Sequence[int] = (512,), threads: Sequence[int] = (2,),
            new_tokens: int = 64, repeats: int = 5, seed: int = 0, flash_attn: bool = False,
            cache_type: str = "f16", on_row: Callable[[SpeedRow], None] | None = None) -> list[SpeedRow]:
    """Rows for every (context, threads) pair, contexts ascending; ``on_row`` sees each as it is measured.
    ``flash_attn``: llama.cpp's fused attention (``-fa on``), which also shrinks its compute buffer.
    ``cache_type``: the K and V cache's element type (``CACHE_TYPES``; ``-ctk``/``-ctv``), which must come
    with ``flash_attn`` unless it is f16."""
    if not contexts or min(contexts) < 1 or not threads or min(threads) < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError("contexts, threads, new_tokens and repeats must be positive")
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache_type: {cache_type!r} is not one of {sorted(CACHE_TYPES)}")
    if cache_type != "f16" and not flash_attn:
        raise ValueError(f"cache_type {cache_type}: llama.cpp quantizes the V cache only with flash attention "
                         "(flash_attn=True, --flash-attn)")
    llama_cpp = import_llama_cpp()
    path = Path(path)
    contexts = sorted(set(contexts))
    most = max(threads)
    ggml_type = getattr(llama_cpp, CACHE_TYPES[cache_type])
    with captured_native_output():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=contexts[-1] + new_tokens + 8, n_batch=PREFILL_BATCH,
                              n_ubatch=PREFILL_BATCH, n_threads=most, n_threads_batch=most, flash_attn=flash_attn,
                              type_k=ggml_type, type_v=ggml_type, verbose=False)
    try:
        ctx = llm._ctx.ctx
        prompt = np.random.default_rng(seed).integers(4, llm.n_vocab(), contexts[-1]).tolist()
        rows = []
        for context in contexts:
            llama_cpp.llama_set_n_threads(ctx, most, most)
            before = llm.n_tokens
            start = time.perf_counter()
            llm.eval(prompt[before:context])
            prefill = (context - before) / (time.perf_counter() - start)
            saved = _SavedState(llama_cpp, llm)
            for n_threads in threads:
                llama_cpp.llama_set_n_threads(ctx, n_threads, n_threads)
                rates = []
                for _ in range(repeats + 1):                 # the first run warms up and is not counted
                    saved.restore(llm)
                    rates.append(new_tokens / _greedy_decode(llama_cpp, llm, saved.next_token, new_tokens))
                row = SpeedRow(path, context, n_threads, prefill, before, new_tokens, rates[1:], os.getloadavg()[0])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            saved.restore(llm)                               # the next segment continues the prompt
        return rows
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamba_moe.export.llama_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="a GGUF file")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512], help="context lengths to decode at")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (-fa on)")
    parser.add_argument("--cache-type", choices=sorted(CACHE_TYPES), default="f16",
                        help="K and V cache element type (-ctk/-ctv); not f16 needs --flash-attn")
    args = parser.parse_args(argv)
    measure(args.gguf, args.contexts, args.threads, args.new_tokens, args.repeats, flash_attn=args.flash_attn,
            cache_type=args.cache_type, on_row=lambda row: print(row.summary(), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
