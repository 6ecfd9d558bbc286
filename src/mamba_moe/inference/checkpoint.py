"""Loading what inference needs from a checkpoint directory: weights + config + tokenizer files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..model.lm import MambaMoEForCausalLM

END_TOKENS = ("<|endoftext|>", "<|im_end|>")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The HF tokenizer saved in ``path`` (tokenizer.json + tokenizer_config.json), or a clear error."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); a "
                                "checkpoint directory for inference needs the tokenizer saved beside the weights")
    from transformers import AutoTokenizer, PretrainedConfig

    # A neutral config stops AutoTokenizer from parsing our config.json as an HF model config:
    # transformers 5.x does so for an unregistered model_type and crashes on its ``rope_scaling``.
    return AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> tuple[MambaMoEForCausalLM, Any]:
    """(model in eval mode, tokenizer) from a directory written by ``save_pretrained`` + the tokenizer."""
    tokenizer = load_tokenizer(path)
    model = MambaMoEForCausalLM.from_pretrained(path, device=device, dtype=dtype).eval()
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
