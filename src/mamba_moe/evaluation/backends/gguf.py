"""A GGUF file through llama-cpp-python (``pip install llama-cpp-python``): llama.cpp's own sampling,
chat template and batching. Imported only when MODEL is a ``.gguf`` file.

Greedy is temperature 0 with every other filter off (top-k 0, top-p 1, min-p 0, no repeat penalty),
so it matches the other backends' argmax decoding. Every answer, plain prompt or chat, is decoded by
``Llama.generate`` (llama.cpp's sampler, token by token) with the stop strings, token limit and text
decoding done here, as the engine does them. llama-cpp-python's ``create_completion`` and
``create_chat_completion`` are not used: they drop bytes that are not valid UTF-8 (``errors="ignore"``)
where the other backends write U+FFFD, and run past ``max_tokens`` to finish a multi-byte character, for
a model whose greedy token is a lone UTF-8 continuation byte until the context is full ("llama_decode
returned 1", 0.3.36). A plain prompt's ids are the ones ``create_completion`` makes (BOS/EOS only where the
file says so, special tokens parsed); a chat's come from the GGUF's embedded template, rendered by
``inference.gguf_runner.GGUFEngine.chat_prompt`` (message contents tokenized as text), as
``mamba-moe chat FILE.gguf`` renders it.
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
from .base import (
    Backend,
    BackendInfo,
    ChoiceRequest,
    ChoiceResult,
    GenRequest,
    GenResult,
    Loglikelihood,
    RollingScore,
    truncate_at_stops,
)
from .scoring import choices, loglikelihoods, rolling


class GGUFBackend(Backend):
    can_score = True
    can_choose = True

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 seed: int = 0) -> None:
        try:
            import llama_cpp
        except ImportError as err:
            raise EvalError("a GGUF MODEL needs llama-cpp-python: pip install llama-cpp-python") from err
        from ...inference.gguf_runner import GGUFEngine

        self.path = Path(path)
        try:
            self.engine = GGUFEngine(self.path, threads=threads, n_ctx=n_ctx or 0, seed=seed)
        except (ValueError, FileNotFoundError) as err:
            raise EvalError(str(err)) from err
        self.llm = self.engine.llm
        # The scorer's context (every position's logits), made on the first scoring call.
        self._scorer_kwargs = {"model_path": str(self.path), "n_ctx": n_ctx or 0, "verbose": False,
                               "n_threads": threads, "seed": seed, "logits_all": True}
        self._scorer = None
        self.max_context = self.engine.max_context
        self.prefix_id = self.llm.token_bos() if self.llm.token_bos() >= 0 else self.llm.token_eos()
        self.info = BackendInfo("gguf", str(self.path.resolve()), {"llama_cpp_python": llama_cpp.__version__,
                                                                   "n_ctx": self.max_context})

    def _prompt_ids(self, request: GenRequest | ChoiceRequest) -> list[int]:
        if request.messages is not None:
            return self.engine.chat_prompt(request.message_dicts())
        return self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)  # type: ignore[union-attr]

    def _answer(self, request: GenRequest) -> GenResult:
        """One answer through ``Llama.generate``: end-of-generation tokens, stop strings and the context's end
        handled like the engine (prompt + answer <= n_ctx)."""
        try:
            prompt = self._prompt_ids(request)
        except ValueError as err:    # a chat the template cannot place, or text that is not a valid message
            return GenResult("", "error", str(err))
        room = self.max_context - len(prompt)
        if not prompt or room < 1:
            return GenResult("", "error", f"prompt: {len(prompt)} tokens, the context holds {self.max_context}")
        if request.seed is not None:
            self.llm.set_seed(request.seed)
        limit, answer, text, reason = min(request.max_tokens, room), [], "", "length"
        for token in self.llm.generate(prompt, temp=request.temperature, top_k=0, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True):
            if token in self.engine.end_ids:
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
        return [self._answer(request) for request in requests]

    def encode_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def count_tokens(self, text: str) -> int:
        return len(self.encode_text(text))

    def logits(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.max_context:
            raise EvalError(f"{self.path}: {len(ids)} tokens, more than n_ctx {self.max_context}")
        if self._scorer is None:
            import llama_cpp

            self._scorer = llama_cpp.Llama(**self._scorer_kwargs)
        self._scorer.reset()
        self._scorer.eval(ids)
        return torch.from_numpy(self._scorer.scores[:len(ids)].copy())

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        return loglikelihoods(self.logits, self.encode_text, self.prefix_id, self.max_context, pairs)

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[RollingScore]:
        return rolling(self.logits, self.encode_text, self.prefix_id, self.max_context, texts)

    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: the last end-of-generation token llama.cpp knows that the
        embedded chat template writes after an assistant message."""
        turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            rendered = self.engine.formatter(messages=turn).prompt
        except ValueError as err:
            raise EvalError(str(err)) from err
        ends = [t for t in self.llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
                if t in self.engine.end_ids]
        if not ends:
            raise EvalError(f"{self.path}: its chat template ends an assistant turn with no end-of-generation "
                            "token, so an answer turn cannot be scored")
        return ends[-1]

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceResult]:
        """Each choice as the assistant turn the embedded template writes: its text (tokenized as text), then
        the end-of-turn token (:meth:`end_of_turn_id`), after the prompt ``generate`` feeds."""
        end = self.end_of_turn_id()
        return choices(self.logits, self._prompt_ids, lambda text: self.encode_text(text) + [end], self.max_context,
                       requests)

    def close(self) -> None:
        self.engine.close()
        if self._scorer is not None:
            self._scorer.close()
