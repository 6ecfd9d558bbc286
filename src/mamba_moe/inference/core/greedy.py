"""The simplest correct generation: prefill once, then decode one token at a time from the cache."""

from __future__ import annotations

import torch
from torch import Tensor

from ...model.lm import MambaMoEForCausalLM


@torch.inference_mode()
def greedy_generate(model: MambaMoEForCausalLM, input_ids: Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to each row of ``input_ids`` (b, l); returns (b, l + n).

    Rows that emit ``eos_token_id`` keep emitting it, so the batch stays rectangular.
    """
    cache = model.new_cache(input_ids.shape[0], device=input_ids.device)
    logits = model(input_ids, cache=cache).logits[:, -1]
    out = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        out.append(token[:, None])
        if eos_token_id is not None and bool(finished.all()):
            break
        logits = model(token[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
