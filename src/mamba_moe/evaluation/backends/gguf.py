"""A GGUF file through llama-cpp-python (``pip install llama-cpp-python``): llama.cpp's own sampling,
chat template and batching. Imported only when MODEL is a ``.gguf`` file.

Greedy is temperature 0 with every other filter off (top-k 0, top-p 1, min-p 0, no repeat penalty),
so it matches the other backends' argmax decoding. Scoring reads llama.cpp's logits of every position
(``logits_all``), through the same windows as the other backends; that needs a second llama.cpp context
(``logits_all`` keeps an n_ctx x vocabulary array and slows every evaluation), made on the first scoring call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import EvalError
from .base import Backend, BackendInfo, GenRequest, GenResult, Loglikelihood, RollingScore, truncate_at_stops
from .scoring import loglikelihoods, rolling


class GGUFBackend(Backend):
    can_score = True

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 seed: int = 0) -> None:
        try:
            import llama_cpp
        except ImportError as err:
            raise EvalError("a GGUF MODEL needs llama-cpp-python: pip install llama-cpp-python") from err
        self.path = Path(path)
        self._llama = llama_cpp.Llama
        self._kwargs = {"model_path": str(self.path), "n_ctx": n_ctx or 0, "verbose": False, "n_threads": threads,
                        "seed": seed}
        self.llm = llama_cpp.Llama(**self._kwargs)
        self._scorer = None
        self.max_context = self.llm.n_ctx()
        self.prefix_id = self.llm.token_bos() if self.llm.token_bos() >= 0 else self.llm.token_eos()
        self.info = BackendInfo("gguf", str(self.path.resolve()), {"llama_cpp_python": llama_cpp.__version__,
                                                                   "n_ctx": self.max_context})

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for request in requests:
            kwargs = {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_k": 0,
                      "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "stop": list(request.stop) or None}
            if request.seed is not None:
                kwargs["seed"] = request.seed
            try:
                if request.messages is not None:
                    response = self.llm.create_chat_completion(messages=request.message_dicts(), **kwargs)
                    choice = response["choices"][0]
                    text = choice["message"]["content"] or ""
                else:
                    response = self.llm.create_completion(prompt=request.prompt, **kwargs)
                    choice = response["choices"][0]
                    text = choice["text"]
            except ValueError as err:   # llama-cpp-python: "Requested tokens (...) exceed context window"
                out.append(GenResult("", "error", str(err)))
                continue
            out.append(GenResult(truncate_at_stops(text, request.stop), choice.get("finish_reason") or "stop"))
        return out

    def encode_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def count_tokens(self, text: str) -> int:
        return len(self.encode_text(text))

    def logits(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.max_context:
            raise EvalError(f"{self.path}: {len(ids)} tokens, more than n_ctx {self.max_context}")
        if self._scorer is None:
            self._scorer = self._llama(**self._kwargs, logits_all=True)
        self._scorer.reset()
        self._scorer.eval(ids)
        return torch.from_numpy(self._scorer.scores[:len(ids)].copy())

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        return loglikelihoods(self.logits, self.encode_text, self.prefix_id, self.max_context, pairs)

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[RollingScore]:
        return rolling(self.logits, self.encode_text, self.prefix_id, self.max_context, texts)

    def close(self) -> None:
        self.llm.close()
        if self._scorer is not None:
            self._scorer.close()
