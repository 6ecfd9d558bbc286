"""An HF causal-LM directory through transformers' ``AutoModelForCausalLM`` (our HF exports and peers).

Requests run one at a time through ``model.generate`` (no padding, so a greedy answer is the same
whatever else is in the run); chats use the tokenizer's own chat template. Nothing is downloaded:
``local_files_only`` is always set.
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class HFBackend(Backend):
    can_score = True
    can_choose = True

    def __init__(self, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32",
                 max_context: int | None = None, gguf_file: str | None = None) -> None:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise EvalError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        self.path = Path(path)
        kwargs = {"local_files_only": True}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=DTYPES[dtype], **kwargs)
        self.model.to(device).eval()
        self.device = torch.device(device)
        config = self.model.config
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        tok = self.tokenizer
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.prefix_id is None:
            raise EvalError(f"{self.path}: the tokenizer has neither a BOS nor an EOS token to start documents with")
        self.info = BackendInfo("hf", str(self.path.resolve()) + (f" ({gguf_file})" if gguf_file else ""), {
            "device": device, "dtype": dtype, "architecture": type(self.model).__name__,
            "transformers": transformers.__version__})

    def _prompt_ids(self, request: GenRequest | ChoiceRequest) -> list[int]:
        if request.messages is not None:   # a ChoiceRequest always has them
            if not getattr(self.tokenizer, "chat_template", None):
                raise EvalError(f"{self.path}: chat mode needs a tokenizer with a chat template")
            ids = self.tokenizer.apply_chat_template(request.message_dicts(), add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]  # type: ignore[union-attr]

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for request in requests:
            ids = self._prompt_ids(request)
            room = self.max_context - len(ids)
            if room < 1:
                out.append(GenResult("", "error", f"prompt: {len(ids)} tokens, the context holds {self.max_context}"))
                continue
            sample = request.temperature > 0
            kwargs = {"do_sample": sample, "max_new_tokens": min(request.max_tokens, room),
                      "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
            if sample:
                kwargs.update(temperature=request.temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(temperature=None, top_k=None, top_p=None)
            if request.stop:
                kwargs.update(stop_strings=list(request.stop), tokenizer=self.tokenizer)
            with torch.inference_mode(), torch.random.fork_rng(devices=[]):
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                output = self.model.generate(torch.tensor([ids], device=self.device), **kwargs)
            new = output[0, len(ids):].tolist()
            reason = "length" if len(new) >= kwargs["max_new_tokens"] else "stop"
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            out.append(GenResult(truncate_at_stops(text, request.stop), reason))
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def logits(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].cpu()

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        return loglikelihoods(self.logits, self.encode_text, self.prefix_id, self.max_context, pairs)

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[RollingScore]:
        return rolling(self.logits, self.encode_text, self.prefix_id, self.max_context, texts)

    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: the last of the generation config's EOS ids that the chat
        template writes after an assistant message (``<|im_end|>`` in our exports, whose EOS list also holds
        ``<|endoftext|>``, which no turn ends with)."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        ids = self.tokenizer.apply_chat_template(turn, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        ends = [i for i in ids if i in eos]
        if not ends:
            raise EvalError(f"{self.path}: the chat template ends an assistant turn with none of the generation "
                            f"config's EOS ids {sorted(eos)}, so an answer turn cannot be scored")
        return ends[-1]

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceResult]:
        """Each choice as the assistant turn the tokenizer's chat template writes: its text, then the
        end-of-turn token (:meth:`end_of_turn_id`), after the prompt ``generate`` feeds."""
        end = self.end_of_turn_id()
        return choices(self.logits, self._prompt_ids, lambda text: self.encode_text(text) + [end], self.max_context,
                       requests)
