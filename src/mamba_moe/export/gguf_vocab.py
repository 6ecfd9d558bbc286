"""The tokenizer as llama.cpp reads it from GGUF: ``tokenizer.ggml.*`` and ``tokenizer.chat_template``.

Our tokenizers are byte-level BPE (``data/tokenizer.py``). llama.cpp's ``gpt2`` tokenizer model is the same
algorithm: the vocabulary is written in id order with the byte-level strings of ``tokenizer.json``
(``Ġthe``), the merges as ``"left right"`` strings in rank order. llama.cpp does not read the split regex
from the file; it re-implements it from the ``tokenizer.ggml.pre`` name, so the name must be one whose
regex is byte-identical to ours (``llama_cpp_pre_name``). A tokenizer with another pre-tokenizer is refused.

No BOS: ``add_bos_token`` is written false (the ``llama-bpe`` pre name would otherwise turn BOS on), and
``bos_token_id`` points at ``<|endoftext|>`` only because llama.cpp's BPE default (id 11) would be a random
token; it is never inserted. ``<|im_end|>`` is written as the end-of-turn token, so chat generation stops
on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..data.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, backend, llama_cpp_pre_name
from .errors import ExportError

# Our pre-tokenizer names (data.tokenizer.llama_cpp_pre_name) -> the names llama.cpp's llama-vocab.cpp accepts.
LLAMA_CPP_PRE_NAMES = {"llama-bpe": "llama-bpe", "gpt2": "gpt-2"}

# gguf.TokenType values (llama_token_type in llama.cpp).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """Everything the GGUF file says about the tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    bos_id: int
    pad_id: int | None
    eot_id: int | None
    chat_template: str


def gguf_vocab(tokenizer: Any, vocab_size: int, eos_token_id: int | None = None,
               pad_token_id: int | None = None) -> GGUFVocab:
    """The GGUF tokenizer description of ``tokenizer`` for a model with ``vocab_size`` embedding rows.

    Rows past the tokenizer's last id (a vocabulary padded for the embedding) become unused ``[PAD<i>]``
    tokens, as llama.cpp's converter writes them. ``eos_token_id`` / ``pad_token_id``: the model config's
    ids, checked against the tokenizer's.
    """
    inner = backend(tokenizer)
    data = json.loads(inner.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer: model type {model.get('type')!r}; GGUF export writes byte-level BPE "
                          "(llama.cpp's 'gpt2' tokenizer model) only")
    ours = llama_cpp_pre_name(tokenizer)
    if ours not in LLAMA_CPP_PRE_NAMES:
        raise ExportError("tokenizer: its pre-tokenizer is not one llama.cpp re-implements byte for byte "
                          "(expected the llama-bpe split of data/tokenizer.py or plain GPT-2 byte-level); "
                          "llama.cpp would split text differently from training")
    if model.get("byte_fallback"):
        raise ExportError("tokenizer: byte_fallback BPE has no llama.cpp 'gpt2' equivalent")
    if data.get("normalizer") is not None:
        raise ExportError(f"tokenizer: has a normalizer ({data['normalizer'].get('type')}); llama.cpp's BPE "
                          "applies none, so ids would differ")

    vocab = inner.get_vocab(with_added_tokens=True)
    n = len(vocab)
    by_id: list[str | None] = [None] * n
    for text, index in vocab.items():
        if not 0 <= index < n or by_id[index] is not None:
            raise ExportError(f"tokenizer: token ids are not 0..{n - 1} without gaps (id {index} for {text!r})")
        by_id[index] = text
    if n > vocab_size:
        raise ExportError(f"tokenizer: {n} tokens but the model's vocab_size is {vocab_size}; they do not "
                          "belong together")

    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(TOKEN_CONTROL if added[index].get("special") else TOKEN_USER_DEFINED) if index in added
             else TOKEN_NORMAL for index in range(n)]
    tokens = [str(t) for t in by_id] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [TOKEN_UNUSED] * (vocab_size - n)

    merges = []
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if " " in left or " " in right:
            raise ExportError(f"tokenizer: merge {rank} ({left!r}, {right!r}) contains a space, which the "
                              "GGUF 'left right' merge format cannot hold")
        merges.append(f"{left} {right}")

    tok_eos = vocab.get(ENDOFTEXT, getattr(tokenizer, "eos_token_id", None))
    eos = eos_token_id if eos_token_id is not None else tok_eos
    if eos is None:
        raise ExportError(f"tokenizer: no {ENDOFTEXT} token and no eos_token_id in config.json; llama.cpp needs "
                          "an end-of-text token")
    if eos_token_id is not None and tok_eos is not None and eos_token_id != tok_eos:
        raise ExportError(f"config.json eos_token_id is {eos_token_id} but the tokenizer's {ENDOFTEXT} is "
                          f"{tok_eos}; they do not belong together")
    pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    if not isinstance(template, str):
        raise ExportError("tokenizer: chat_template is not a single template string (named templates are not "
                          "supported by tokenizer.chat_template)")
    eot = vocab.get(IM_END)
    return GGUFVocab(pre=LLAMA_CPP_PRE_NAMES[ours], tokens=tokens, token_types=types, merges=merges,
                     eos_id=int(eos), bos_id=int(eos), pad_id=None if pad is None else int(pad),
                     eot_id=None if eot is None else int(eot), chat_template=template)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_bos_token_id(vocab.bos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)
