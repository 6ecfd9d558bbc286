"""Our checkpoint directory, through the batched inference ``Engine`` (generation) and the model (scoring,
batched with padding where the router allows it: ``scoring.score_units``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import (
    Backend,
    BackendInfo,
    ChoiceRequest,
    ChoiceResult,
    GenRequest,
    GenResult,
    Loglikelihood,
    RollingScore,
)
from .scoring import choices, loglikelihoods, rolling


def config_digest(path: Path) -> str:
    """Identity of a checkpoint for the sample cache: its config and the size and mtime of its weights."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            st = (path / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class CheckpointBackend(Backend):
    can_score = True
    can_choose = True

    def __init__(self, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", max_batch: int = 16,
                 decoder: str = "model", batch_scoring: bool = True) -> None:
        from ...inference import load_engine

        self.path = Path(path)
        self.batch_scoring = batch_scoring   # False: score one sequence at a time (the reference path)
        self.engine = load_engine(self.path, device=device, dtype=dtype, decoder=decoder, max_batch=max_batch)
        self.max_context = self.engine.max_context
        from ...data.tokenizer import raw_copy, special_ids

        self._doc_tokenizer = raw_copy(self.engine.tokenizer, encode_special_tokens=True)
        self.prefix_id = special_ids(self.engine.tokenizer).eos
        self.info = BackendInfo("checkpoint", str(self.path.resolve()), {
            "device": device, "dtype": dtype, "decoder": decoder, "digest": config_digest(self.path),
            "parameters": sum(p.numel() for p in self.engine.model.parameters())})

    # ---- generation ------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenRequest | ChoiceRequest) -> list[int]:
        if request.messages is not None:
            return self.engine.chat_prompt(request.message_dicts())
        return self.engine.encode(request.prompt)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        from ...inference import SamplingParams

        results: list[GenResult | None] = [None] * len(requests)
        prompts, params, where = [], [], []
        for i, request in enumerate(requests):
            ids = self._prompt_ids(request)
            room = self.max_context - len(ids)
            if not ids or room < 1:
                results[i] = GenResult("", "error", f"prompt: {len(ids)} tokens, the context holds {self.max_context}")
                continue
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=min(request.max_tokens, room), temperature=request.temperature,
                                         stop=request.stop, seed=request.seed))
            where.append(i)
        if prompts:
            for i, completion in zip(where, self.engine.generate(prompts, params), strict=True):
                results[i] = GenResult(completion.text, completion.finish_reason)
        return results  # type: ignore[return-value]

    def count_tokens(self, text: str) -> int:
        return len(self.engine.encode(text))

    # ---- scoring ---------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Document text to ids with special-token strings as plain text (as ``data prepare`` encodes documents)."""
        return self._doc_tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def logits(self, ids: list[int]) -> torch.Tensor:
        model = self.engine.model
        device = next(model.parameters()).device
        with torch.inference_mode():
            return model(torch.tensor([ids], dtype=torch.long, device=device), router_stats=False).logits[0].cpu()

    def batch_logits(self, inputs: list[list[int]], keep: int) -> torch.Tensor:
        """Logits (b, keep, V) of the last ``keep`` positions of each input, left-padded under a mask: the
        model's mask keeps padding out of attention, the Mamba2 state and the conv, and positions count
        real tokens only, so each row is computed as if alone (to rounding)."""
        model = self.engine.model
        device = next(model.parameters()).device
        width = max(len(ids) for ids in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        mask = torch.zeros(len(inputs), width, dtype=torch.bool)
        for row, seq in enumerate(inputs):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
        with torch.inference_mode():
            return model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep,
                         router_stats=False).logits.cpu()

    @property
    def _batch_fn(self):
        # Switch's expert capacity counts every token of a batch, so padding and neighbours would change
        # which tokens overflow: those models score one sequence at a time
        return self.batch_logits if self.batch_scoring and self.engine.model.config.moe_router != "switch" else None

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        return loglikelihoods(self.logits, self.encode_text, self.prefix_id, self.max_context, pairs,
                              batch_logits_fn=self._batch_fn)

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[RollingScore]:
        return rolling(self.logits, self.encode_text, self.prefix_id, self.max_context, texts,
                       batch_logits_fn=self._batch_fn)

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceResult]:
        """Each choice as the answer turn SFT trains on (``data/chat.py``'s ``answer_turn``) after the prompt
        ``generate`` feeds."""
        from ...data.chat import answer_turn

        prompts = self.engine.prompts
        return choices(self.logits, self._prompt_ids, lambda text: answer_turn(prompts.content, prompts.special, text),
                       self.max_context, requests, self._batch_fn)

    def close(self) -> None:
        self.engine = None  # type: ignore[assignment]
