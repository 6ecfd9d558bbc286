"""``mamba-moe generate FILE.gguf`` and ``chat FILE.gguf``: a GGUF file run by llama.cpp (llama-cpp-python).

    mamba-moe generate model-q4_k_m.gguf "Once upon a time" --max-tokens 64 --temperature 0 --threads 2
    mamba-moe chat model-q4_k_m.gguf --system "You are concise."

So a user checks an exported file in one command, through the runtime a phone would use. ``GGUFEngine`` has
the part of ``core.engine.Engine``'s interface that ``generate`` and ``chat`` use (``encode``,
``chat_prompt``, ``stream``, ``max_context``): llama.cpp tokenizes, evaluates and samples; the request
bookkeeping is ours (``core.request.Request``: end tokens, stop strings, max tokens, the context limit,
incremental UTF-8 text), so the same options mean the same thing for a checkpoint and for its GGUF.

What maps: ``--max-tokens``, ``--temperature`` (0 = greedy), ``--top-k``, ``--top-p``, ``--min-p``, ``--stop``,
``--seed``, ``--threads`` (llama.cpp's threads), ``--prefill-chunk`` (llama.cpp's ``n_batch``).
``--repetition-penalty`` becomes llama.cpp's ``repeat_penalty``, which looks at the last 64 tokens only (ours:
the whole prompt and output). llama.cpp applies its filters in its own order (penalty, top-k, top-p,
min-p, temperature), so sampled text is not token-for-token ours; greedy is.

Chat prompts are rendered with the chat template embedded in the GGUF (``tokenizer.chat_template``), the
way llama.cpp users get it, but the content of each message is tokenized as text: the template is rendered
with placeholders in place of the contents, its own text is tokenized with special tokens recognised, and
each content without. A message that spells ``<|im_end|>`` cannot close its turn (as in ``data/chat.py``).
"""

from __future__ import annotations

import ctypes
import secrets
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..user_text import check_text
from .chat import check_messages
from .core.request import Request, StreamEvent
from .core.sampling import SamplingParams

# Flags of the checkpoint engine that have no meaning for a GGUF file, with their defaults.
_TORCH_ONLY = {"device": "cpu", "dtype": "float32", "quantize": "none", "decoder": "fast"}


def is_gguf_file(path: str | Path) -> bool:
    """True when MODEL names a GGUF file (by its suffix; a directory is always a checkpoint)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


class LlamaText:
    """Token ids to text through llama.cpp's vocabulary, with the ``decode`` that ``IncrementalDecoder`` calls.

    Each token's bytes come from ``llama_token_to_piece`` (cached); the bytes of a window are decoded with
    replacement, as HF tokenizers' byte-level decoder does. (llama-cpp-python's ``detokenize`` is not used:
    it drops a leading space after a BOS token, and ours is the end-of-text token.)
    """

    def __init__(self, llama_cpp: Any, vocab: Any) -> None:
        self._llama_cpp = llama_cpp
        self._vocab = vocab
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        if key not in self._pieces:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
                if n >= 0:
                    break
                size = -n     # too small: llama.cpp returns minus the length it needs
            self._pieces[key] = buffer.raw[:n]
        return self._pieces[key]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.piece(t, not skip_special_tokens) for t in ids).decode("utf-8", "replace")


class GGUFEngine:
    """A GGUF file in llama.cpp, behind the interface ``generate`` and ``chat`` use. ``close()`` it (or let the
    finalizer do it at exit: llama-cpp-python 0.3.36's ``Llama.__del__`` raises during interpreter shutdown).

    ``n_ctx``: context tokens (prompt + output; 0 = the length the GGUF was trained for). ``threads``: llama.cpp
    threads for prefill and decode (None = llama-cpp-python's default, half the cores). ``n_batch``: prompt
    tokens per llama.cpp batch.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, n_batch: int = 512, n_ctx: int = 0,
                 seed: int | None = None) -> None:
        from ..export.llama_quant import captured_native_output, import_llama_cpp

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: not found (a .gguf MODEL must be a GGUF file)")
        try:
            llama_cpp = import_llama_cpp()
        except ValueError as err:
            raise ValueError(f"{self.path}: running a GGUF file {err}") from err
        # Flash attention: without it llama.cpp's compute buffer holds a batch x context score matrix per head
        # (1.1 GB for mamba-moe-300m at its 32k context, 2.1 GB with 16 heads); on the CPU it computes the
        # same logits (NMSE ~5e-12).
        kwargs: dict[str, Any] = {"model_path": str(self.path), "n_ctx": n_ctx, "n_batch": n_batch,
                                  "n_ubatch": n_batch, "n_threads": threads, "n_threads_batch": threads,
                                  "flash_attn": True, "verbose": False}
        if seed is not None:
            kwargs["seed"] = seed
        with captured_native_output() as log:
            try:
                self.llm = llama_cpp.Llama(**kwargs)
            except (ValueError, RuntimeError) as err:
                failed = err
            else:
                failed = None
        if failed is not None:   # llama.cpp's own reason is in its log, not in the exception
            tail = "\n".join(log[0].strip().splitlines()[-6:])
            raise ValueError(f"{self.path}: llama.cpp could not load it ({failed})\n{tail}") from failed
        self._closer = weakref.finalize(self, self.llm.close)
        self.max_context = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        vocab = self.llm._model.vocab
        self.text = LlamaText(llama_cpp, vocab)
        # llama.cpp's end-of-generation set (its EOS, EOT and the end tokens it recognises by name).
        self.end_ids = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self._formatter: Any = None

    @classmethod
    def from_args(cls, args: Any) -> GGUFEngine:
        """The engine ``generate``/``chat`` flags describe; flags that only mean something for a PyTorch
        checkpoint are refused by name rather than ignored."""
        if getattr(args, "memory", None) is not None:
            raise ValueError("--memory: needs a checkpoint directory (the working memory carries the PyTorch "
                             "model's decode state between turns), not a GGUF file")
        for name, default in _TORCH_ONLY.items():
            value = getattr(args, name, default)
            if value != default:
                raise ValueError(f"--{name} {value}: does not apply to a GGUF file (llama.cpp runs it on the CPU "
                                 "with the tensor types chosen at export)")
        return cls(args.checkpoint, threads=args.threads, n_batch=args.prefill_chunk, seed=args.seed)

    # ---- prompts ---------------------------------------------------------------------------------
    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Ids of a prompt: text as ``Engine.encode`` reads it (special-token strings recognised), or ids."""
        if isinstance(prompt, str):
            return self._tokenize(check_text(prompt, "prompt"), special=True)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of a conversation in the GGUF's embedded chat template, ending in the assistant's generation
        prompt; message contents are tokenized as text (see the module docstring)."""
        clean = check_messages(messages)
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(clean))]
        rendered = self.formatter(messages=[{"role": m["role"], "content": mark}
                                            for m, mark in zip(clean, marks, strict=True)]).prompt
        ids: list[int] = []
        rest = rendered
        for i, (message, mark) in enumerate(zip(clean, marks, strict=True)):
            before, found, rest = rest.partition(mark)
            if not found or mark in rest:
                raise ValueError(f"{self.path}: its chat template does not place messages[{i}].content "
                                 "verbatim, once; it cannot be used to build a prompt safely")
            ids += self._tokenize(before, special=True) + self._tokenize(message["content"], special=False)
        return ids + self._tokenize(rest, special=True)

    @property
    def formatter(self) -> Any:
        """llama-cpp-python's Jinja renderer of the GGUF's ``tokenizer.chat_template`` (made on first use)."""
        if self._formatter is None:
            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise ValueError(f"{self.path}: has no tokenizer.chat_template, so it cannot format a chat")
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template, eos_token=self.text.decode([eos], False) if eos >= 0 else "",
                bos_token=self.text.decode([bos], False) if bos >= 0 else "", add_generation_prompt=True)
        return self._formatter

    # ---- running ---------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """One event per generated token, sampled by llama.cpp; the last has finish_reason set."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt: empty; give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(f"prompt: {len(ids)} tokens, but the context holds {self.max_context} "
                             "(prompt + output); shorten the prompt")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.end_ids)
        request = Request(ids, params, stop_ids=stop_ids, tokenizer=self.text, vocab_size=self.vocab_size,
                          max_length=self.max_context)
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        # The previous prompt's state is never reused: llama.cpp cannot cut a Mamba2 state back to a prefix.
        self.llm.reset()
        tokens = self.llm.generate(ids, temp=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                   min_p=params.min_p, repeat_penalty=params.repetition_penalty, reset=True)
        try:
            for token in tokens:
                event = request.accept(int(token))
                yield event
                if request.finished:
                    return
        finally:
            tokens.close()

    def close(self) -> None:
        self._closer()
