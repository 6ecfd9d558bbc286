"""llama.cpp through llama-cpp-python, for the parity tests of GGUF files (export, growth, LoRA merges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


def llama_cpp_or_skip(needed_for: str) -> Any:
    """The llama_cpp module, or a skip that says how to install it and what needs it."""
    return pytest.importorskip("llama_cpp", exc_type=ImportError,
                               reason="llama-cpp-python==0.3.36 (bash scripts/install-llama-cpp.sh, which builds "
                                      f"llama.cpp from source) is not installed; {needed_for} needs it")


def nmse(actual: np.ndarray, expected: np.ndarray) -> float:
    """Normalised mean squared error, sum((a - e)^2) / sum(e^2): llama.cpp's test-backend-ops measure."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(((actual - expected) ** 2).sum() / (expected ** 2).sum())


class LlamaRunner:
    """One llama-cpp-python model; ``close()`` it (0.3.36's ``__del__`` raises at interpreter exit).

    The KV cache is f32 (llama.cpp's default f16 cache alone adds ~1e-7 NMSE on an all-attention model),
    so the comparison measures the export, not the cache precision.
    """

    def __init__(self, llama_cpp: Any, path: Path, n_ctx: int = 256, threads: int = 2) -> None:
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False, seed=0,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """Logits of every position of ``ids`` evaluated as one prompt (n_tokens, vocab)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def stepwise_logits(self, ids: list[int]) -> np.ndarray:
        """Logits of every position with the tokens fed one at a time (the decode path, state carried)."""
        self.llm.reset()
        rows = []
        for t in ids:
            self.llm.eval([t])
            rows.append(np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64))
        return np.stack(rows)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """n greedy tokens after ``ids`` (argmax of llama.cpp's logits), and the logits each was chosen from."""
        self.llm.reset()
        self.llm.eval(ids)
        out, rows = [], []
        for _ in range(n):
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
            rows.append(row)
            out.append(int(row.argmax()))
            self.llm.eval([out[-1]])
        return out, np.stack(rows)

    def close(self) -> None:
        self.llm.close()
