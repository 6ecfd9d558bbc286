"""Loading what inference needs from a checkpoint: weights + config + tokenizer, on a device.

Two decisions are made elsewhere, once: which directory is a complete checkpoint
(``checkpoint_dirs.resolve_model_dir``: a step directory, a run's ``checkpoints/`` folder or the run folder,
as ``train --checkpoint`` accepts; damaged files named), and how a tokenizer directory is read
(``data/tokenizer.py:load_tokenizer``, which also keeps transformers from parsing our config.json).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ...checkpoint_dirs import resolve_model_dir
from ...data.chatml import END_TOKENS
from ...data.tokenizer import load_tokenizer
from ...devices import resolve_device
from ...model.lm import MambaMoEForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``, refused by name when it is not one or this machine lacks it."""
    return resolve_device(device)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype given by name (``"bfloat16"``) or as a ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> tuple[MambaMoEForCausalLM, Any]:
    """(model in eval mode, tokenizer) from a directory written by ``save_pretrained`` + the tokenizer, or
    from the newest complete checkpoint of a run folder / ``checkpoints/`` folder (said on stderr when a
    newer damaged one is skipped)."""
    device = parse_device(device)
    path = resolve_model_dir(path)
    tokenizer = load_tokenizer(path)
    model = MambaMoEForCausalLM.from_pretrained(path, device=device, dtype=parse_dtype(dtype)).eval()
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; they do not belong together")
    return model, tokenizer


def end_token_ids(tokenizer: Any, eos_token_id: int | None = None) -> frozenset[int]:
    """Tokens that end a generation: the tokenizer's EOS, ``<|endoftext|>``, ``<|im_end|>`` and the config's EOS."""
    ids = set() if eos_token_id is None else {eos_token_id}
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return frozenset(ids)
