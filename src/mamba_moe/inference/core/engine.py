"""The generation engine: prompts (text or ids) in, completions or token-by-token streams out.

    engine = Engine.from_pretrained("ckpt/")
    print(engine.generate("Once upon a time", SamplingParams(max_tokens=64, temperature=0.8)).text)
    for event in engine.stream("Once upon a time"):
        print(event.text, end="", flush=True)

Prompts of one ``generate`` call run as one continuously batched decode (left-padded prefill on a
fresh cache, in chunks of ``prefill_chunk`` tokens; finished rows leave, waiting prompts join).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import torch

from ...model.cache import HybridCache
from ...model.lm import MambaMoEForCausalLM
from .batch import DecodeBatch
from .checkpoint import end_token_ids, load_checkpoint, parse_device, parse_dtype
from .prompt import PromptEncoder, PromptTooLongError
from .request import Completion, Request, StreamEvent
from .sampling import SamplingParams

Prompt = str | Sequence[int]


def make_decoder(model: MambaMoEForCausalLM, kind: str, max_context: int, max_batch: int = 64) -> Any:
    """The decode step for ``Engine(decoder=kind)``: None for the model's own forward."""
    if kind == "model":
        return None
    from ..decoders.fast_decode import FastDecoder

    if kind == "cuda-graphs":
        from ..decoders.cuda_graphs import GraphDecoder

        return GraphDecoder(FastDecoder(model), max_context, max_batch)
    return FastDecoder(model, int8=kind == "fast-int8")


class Engine:
    """Generation from one model (and optionally its tokenizer, needed for text prompts and output).

    ``max_context``: prompt + output tokens per sequence (default: the config's
    ``max_position_embeddings``); generation stops with finish_reason "length" there.
    ``decoder``: how decode steps run: "model" (the model's forward, the reference), "fast" (the
    lean fused step of ``fast_decode.py``), "fast-int8" (the same with int8 weights, CPU, float32
    model), or "cuda-graphs" (the fast step captured in CUDA graphs per batch size, CUDA only).
    """

    DECODERS = ("model", "fast", "fast-int8", "cuda-graphs")

    def __init__(self, model: MambaMoEForCausalLM, tokenizer: Any = None, *, prefill_chunk: int = 512,
                 max_context: int | None = None, max_batch: int = 16, decoder: str = "model") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be a positive integer (got {max_batch!r})")
        if decoder not in self.DECODERS:
            raise ValueError(f"decoder: expected one of {', '.join(self.DECODERS)}, got {decoder!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.max_context = max_context or model.config.max_position_embeddings
        self.end_ids = end_token_ids(tokenizer, model.config.eos_token_id)
        self.decoder_kind = decoder
        self.decoder = make_decoder(model, decoder, self.max_context, max_batch)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> Engine:
        model, tokenizer = load_checkpoint(path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    # ---- prompts ---------------------------------------------------------------------------------
    @cached_property
    def prompts(self) -> PromptEncoder:
        """Text and chats to ids (built on first use: an engine over ids alone needs no tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("prompt: text prompts and chats need a tokenizer; pass token ids or give the engine one")
        return PromptEncoder(self.tokenizer)

    def encode(self, prompt: Prompt, max_tokens: int | None = None) -> list[int]:
        """Token ids of a prompt: text is tokenized as is (special tokens in it are recognised; text that is
        not valid UTF-8 is refused by position). ``max_tokens``: refuse longer prompts
        (``PromptTooLongError``), text that cannot fit before it is tokenized."""
        if isinstance(prompt, str):
            return self.prompts.text(prompt, "prompt", max_tokens)
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt: expected text or a list of integer token ids")
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt: token ids must lie in [0, {vocab})")
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLongError("prompt", max_tokens, tokens=len(ids))
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                    max_messages: int | None = None) -> list[int]:
        """Token ids of a conversation in the project's ChatML, ending in the assistant's generation prompt.

        Markers come only from the template: content is encoded with special tokens as text, so a message
        cannot close its turn or open another (``core/prompt.py``, data's ``encode_chat_prompt``)."""
        if self.tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer")
        return self.prompts.chat(messages, max_tokens, max_messages)

    def request(self, prompt: Prompt, params: SamplingParams | None = None, *, cache: HybridCache | None = None,
                keep_cache: bool = False) -> Request:
        """A validated request for the batch; errors (ValueError) name what is wrong.

        ``cache``: a one-row decode state to continue (the prompt is then only the new tokens; the cache is
        advanced in place, so pass a clone to keep it). ``keep_cache``: the finished request's
        ``final_cache`` holds its decode state, to continue from next time (``memory/working.py``).
        """
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt: empty; give at least one token")
        past = 0
        if cache is not None:
            if cache.batch_size != 1:
                raise ValueError(f"cache: holds {cache.batch_size} rows; a request continues one sequence")
            past = int(cache.positions[0])
        if past + len(ids) >= self.max_context:
            held = f" on top of the {past} already in the cache" if past else ""
            raise ValueError(f"prompt: {len(ids)} tokens{held}, but the context holds {self.max_context} "
                             "(prompt + output); shorten the prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.end_ids)
        return Request(ids, params, stop_ids=stop_ids, tokenizer=self.tokenizer,
                       vocab_size=self.model.config.vocab_size, max_length=self.max_context,
                       start_cache=cache, past_tokens=past, keep_cache=keep_cache)

    # ---- running ---------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> Iterator[StreamEvent]:
        """Events of all ``requests`` as they happen, at most ``max_batch`` decoding at once."""
        waiting = deque(requests)
        batch = DecodeBatch(self.model, self.prefill_chunk, self.decoder)
        while waiting or len(batch):
            room = self.max_batch - len(batch)
            if waiting and room > 0:
                yield from batch.add([waiting.popleft() for _ in range(min(room, len(waiting)))])
            yield from batch.step()

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a list of prompts (returns a list, in order).

        A prompt is text or a list of token ids; a 1-D / 2-D tensor of ids counts as one / several prompts.
        """
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and
                                              (not prompts or isinstance(prompts[0], int)))
        prompt_list = [prompts] if single else list(prompts)
        param_list = params if isinstance(params, list) else [params] * len(prompt_list)
        if len(param_list) != len(prompt_list):
            raise ValueError(f"params: {len(param_list)} given for {len(prompt_list)} prompts")
        requests = [self.request(p, s) for p, s in zip(prompt_list, param_list, strict=True)]
        for _ in self.run(requests):
            pass
        completions = [r.completion() for r in requests]
        return completions[0] if single else completions

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one event per generated token (text delta + token ids); the last has finish_reason set."""
        yield from self.run([self.request(prompt, params)])

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> Completion:
        return self.generate(self.chat_prompt(messages), params)

    def stream_chat(self, messages: list[dict[str, str]],
                    params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        return self.stream(self.chat_prompt(messages), params)


def load_engine(path: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                dtype: str | torch.dtype | None = "float32", decoder: str = "model", quantize: str = "none",
                prefill_chunk: int = 512, max_batch: int = 16) -> Engine:
    """An engine over the checkpoint at ``path``: what ``generate``, ``chat`` and ``serve`` run.

    ``decoder`` as in ``Engine``; ``quantize="int8"`` also turns the model's own linears into int8 (so
    prefill runs int8 too), and with ``decoder="fast"`` picks the fused step's int8 form, whose weights
    must be made from the float model before it is quantized. ``max_batch`` sizes the CUDA-graph buckets.
    Every argument is checked by name before anything is loaded.
    """
    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize: expected 'none' or 'int8', got {quantize!r}")
    if decoder not in Engine.DECODERS:
        raise ValueError(f"decoder: expected one of {', '.join(Engine.DECODERS)}, got {decoder!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk: must be a positive integer (got {prefill_chunk!r})")
    device, dtype = parse_device(device), parse_dtype(dtype)
    if quantize == "int8" and decoder == "fast":
        decoder = "fast-int8"
    engine = Engine.from_pretrained(path, device=device, dtype=dtype, prefill_chunk=prefill_chunk,
                                    decoder=decoder, max_batch=max_batch)
    if quantize == "int8":
        from ..decoders.quantize import quantize_int8

        quantize_int8(engine.model)
    return engine
