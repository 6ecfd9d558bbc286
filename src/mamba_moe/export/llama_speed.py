"""How fast llama.cpp (through llama-cpp-python) runs a GGUF file on this machine's CPU: prefill and decode.

    python -m mamba_moe.export.llama_speed model-q4_k_m.gguf --threads 2 --runs 5

Decode is timed token by token (one ``eval`` of one token each, greedy), after a prompt of
``prompt_tokens`` random ids; the median over ``runs`` is reported. An indicative number for the machine it
runs on, not a phone's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .llama_quant import captured_native_output, import_llama_cpp


@dataclass
class SpeedReport:
    path: Path
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: list[float]
    decode_tok_s: list[float]

    def summary(self) -> str:
        return (f"{self.path.name}: {self.path.stat().st_size / 2**20:.1f} MiB, {self.threads} thread(s): prefill "
                f"{statistics.median(self.prefill_tok_s):.1f} tok/s ({self.prompt_tokens} tokens), decode "
                f"{statistics.median(self.decode_tok_s):.1f} tok/s (median of {len(self.decode_tok_s)} runs of "
                f"{self.new_tokens} tokens; all: {', '.join(f'{v:.1f}' for v in self.decode_tok_s)})")


def measure(path: str | Path, threads: int = 2, prompt_tokens: int = 64, new_tokens: int = 64, runs: int = 5,
            seed: int = 0) -> SpeedReport:
    llama_cpp = import_llama_cpp()
    path = Path(path)
    with captured_native_output():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens + 8, n_batch=512,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        rng = np.random.default_rng(seed)
        vocab = llm.n_vocab()
        prefill, decode = [], []
        for _ in range(runs + 1):                       # the first run warms up and is not counted
            prompt = rng.integers(4, vocab, prompt_tokens).tolist()
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            prefill_s = time.perf_counter() - start
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            start = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            decode_s = time.perf_counter() - start
            prefill.append(prompt_tokens / prefill_s)
            decode.append(new_tokens / decode_s)
        return SpeedReport(path, threads, prompt_tokens, new_tokens, prefill[1:], decode[1:])
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamba_moe.export.llama_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="a GGUF file")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    for threads in args.threads:
        print(measure(args.gguf, threads, args.prompt_tokens, args.new_tokens, args.runs).summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
