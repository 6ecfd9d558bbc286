"""A GGUF file through llama-cpp-python (``pip install llama-cpp-python``): llama.cpp's own sampling,
chat template and batching. Imported only when MODEL is a ``.gguf`` file.

Greedy is temperature 0 with every other filter off (top-k 0, top-p 1, min-p 0, no repeat penalty),
so it matches the other backends' argmax decoding. Plain prompts are decoded by ``Llama.generate`` (llama.cpp's
sampler, token by token) with the stop strings, token limit and text decoding done here, as the engine
does them: ``create_completion`` drops bytes that are not valid UTF-8 (``errors="ignore"``) where the other
backends write U+FFFD, runs past ``max_tokens`` to finish a multi-byte character, and for some hybrid
models stops with "llama_decode returned 1" partway through an answer (0.3.36), all of which
``generate`` avoids. Chats go through ``create_chat_completion`` (the file's own template).
Scoring reads llama.cpp's logits of every position (``logits_all``), through the same windows as the other
backends; that needs a second llama.cpp context (``logits_all`` keeps an n_ctx x vocabulary array and slows
every evaluation), made on the first scoring call.
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

    def _complete(self, request: GenRequest) -> GenResult:
        """A plain prompt through ``Llama.generate``: the prompt's tokens as ``create_completion`` makes them
        (BOS/EOS only where the file says so, special tokens parsed), end-of-generation tokens, stop strings
        and the context's end handled like the engine (prompt + answer <= n_ctx)."""
        import llama_cpp

        prompt = self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
        room = self.max_context - len(prompt)
        if not prompt or room < 1:
            return GenResult("", "error", f"prompt: {len(prompt)} tokens, the context holds {self.max_context}")
        if request.seed is not None:
            self.llm.set_seed(request.seed)
        limit, answer, text, reason = min(request.max_tokens, room), [], "", "length"
        vocab = self.llm._model.vocab
        for token in self.llm.generate(prompt, temp=request.temperature, top_k=0, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            answer.append(token)
            text = self.llm.detokenize(answer, prev_tokens=prompt).decode("utf-8", errors="replace")
            cut = truncate_at_stops(text, request.stop)
            if len(cut) < len(text):
                text, reason = cut, "stop"
                break
            if len(answer) >= limit:   # stop before the generator feeds this token back (n_ctx may be full)
                break
        return GenResult(text, reason)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for request in requests:
            if request.prompt is not None:
                out.append(self._complete(request))
                continue
            kwargs = {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_k": 0,
                      "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "stop": list(request.stop) or None}
            if request.seed is not None:
                kwargs["seed"] = request.seed
            try:
                response = self.llm.create_chat_completion(messages=request.message_dicts(), **kwargs)
                choice = response["choices"][0]
                text = choice["message"]["content"] or ""
            except ValueError as err:   # llama-cpp-python: "Requested tokens (...) exceed context window"
                out.append(GenResult("", "error", str(err)))
                continue
            except RuntimeError as err:
                # llama-cpp-python feeds back the token that fills n_ctx exactly ("llama_decode returned 1"):
                # a failed sample, not a dead harness
                out.append(GenResult("", "error", f"llama.cpp: {err} (the answer reached n_ctx "
                                                  f"{self.max_context})"))
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
