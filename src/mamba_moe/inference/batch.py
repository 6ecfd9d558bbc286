"""The running batch: a model, the decode state of every active request, and one step at a time.

``add`` prefills new requests together (left-padded, in chunks) on a fresh cache, samples their first
tokens and merges them into the running batch; ``step`` decodes one token for every active request.
Finished and cancelled requests leave the batch at once, so new ones never wait for the slowest.

Decode shape, for a future CUDA-graph path: each step is ``embed -> backbone.run(cache) -> head`` on a
(b, 1) token tensor. Mamba state is fixed-size; attention keys live in preallocated buffers
(``KVState.reserve``). Capturing it needs a fixed batch (pad rows instead of dropping them) and a fixed
key length (mask instead of slice), see docs/inference.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.cache import HybridCache
from ..model.lm import MambaMoEForCausalLM
from . import cache_ops
from .request import Request, StreamEvent


class DecodeBatch:
    """Continuous batching over one model. Not thread-safe: one thread drives ``add`` and ``step``."""

    def __init__(self, model: MambaMoEForCausalLM, prefill_chunk: int = 512) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be a positive integer (got {prefill_chunk!r})")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype     # the cache's dtype, whatever form the linears take
        self.pad_id = model.config.pad_token_id or 0
        self.rows: list[Request] = []
        self.cache: HybridCache | None = None

    def __len__(self) -> int:
        return len(self.rows)

    # ---- model calls ---------------------------------------------------------------------------
    def _last_logits(self, ids: Tensor, mask: Tensor | None, cache: HybridCache) -> Tensor:
        """Logits (b, V) of the last position only: the head is not run over the whole prompt."""
        model = self.model
        hidden = model.backbone.run(model.embed(ids), mask, cache).hidden[:, -1]
        return model.embed.logits(hidden) if model.lm_head is None else model.lm_head(hidden)

    def prefill(self, prompts: list[list[int]], cache: HybridCache) -> Tensor:
        """Run left-padded prompts through ``cache`` in chunks of ``prefill_chunk``; last-position logits."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded_until = length - min(len(p) for p in prompts)   # columns before this hold some padding
        logits = None
        for start in range(0, length, self.prefill_chunk):
            end = min(start + self.prefill_chunk, length)
            chunk_mask = mask[:, start:end] if start < padded_until else None
            logits = self._last_logits(ids[:, start:end], chunk_mask, cache)
        return logits

    def _choose(self, logits: Tensor, rows: list[Request]) -> list[int]:
        if not any(r.needs_sampler for r in rows):
            return logits.argmax(-1).tolist()
        return [r.choose(logits[i]) for i, r in enumerate(rows)]

    # ---- batch management ------------------------------------------------------------------------
    def _remaining(self, rows: list[Request]) -> int:
        """Key positions to reserve beyond the current ones: the most any row may still generate."""
        return max((r.remaining for r in rows), default=0)

    def add(self, requests: list[Request]) -> list[StreamEvent]:
        """Prefill ``requests`` together and join them to the batch; returns their first events."""
        if not requests:
            return []
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"request {r.request_id}: empty prompt; give at least one token")
        with torch.inference_mode():
            cache = self.model.new_cache(len(requests), device=self.device, dtype=self.dtype)
            cache_ops.reserve(cache, max(len(r.prompt_ids) for r in requests) + self._remaining(requests))
            logits = self.prefill([r.prompt_ids for r in requests], cache)
            events = [r.accept(t) for r, t in zip(requests, self._choose(logits, requests), strict=True)]
            alive = [i for i, r in enumerate(requests) if not r.finished]
            if alive:
                rows = [requests[i] for i in alive]
                if len(alive) < len(requests):
                    cache = cache_ops.select_rows(cache, alive, cache.seen_tokens + self._remaining(rows))
                if self.cache is None:
                    self.cache, self.rows = cache, rows
                else:
                    merged = self.rows + rows
                    self.cache = cache_ops.concat([self.cache, cache],
                                                  max(self.cache.seen_tokens, cache.seen_tokens)
                                                  + self._remaining(merged))
                    self.rows = merged
        return events

    def step(self) -> list[StreamEvent]:
        """Decode one token for every active request; finished ones leave the batch."""
        if not self.rows:
            return []
        with torch.inference_mode():
            tokens = torch.tensor([[r.output_ids[-1]] for r in self.rows], dtype=torch.long, device=self.device)
            logits = self._last_logits(tokens, None, self.cache)
            events = [r.accept(t) for r, t in zip(self.rows, self._choose(logits, self.rows), strict=True)]
            self._drop_finished()
        return events

    def cancel(self, request_ids: set[int]) -> list[StreamEvent]:
        """Abort the given requests (those in this batch); returns their final events."""
        events = [r.cancel() for r in self.rows if r.request_id in request_ids and not r.finished]
        if events:
            with torch.inference_mode():
                self._drop_finished()
        return events

    def _drop_finished(self) -> None:
        alive = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(alive) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in alive]
        if not alive:
            self.cache = None
            return
        self.cache = cache_ops.select_rows(self.cache, alive, self.cache.seen_tokens + self._remaining(self.rows))
