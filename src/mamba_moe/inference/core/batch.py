"""The running batch: a model, the decode state of every active request, and one step at a time.

``add`` prefills new requests together (left-padded, in chunks) on a fresh cache, samples their first
tokens and merges them into the running batch; ``step`` decodes one token for every active request.
Finished and cancelled requests leave the batch at once, so new ones never wait for the slowest.

Decode steps run the model's forward (the reference) or a ``decoder`` such as ``fast_decode.FastDecoder``
(the model's decode step over packed, optionally int8, weights) or ``cuda_graphs.GraphDecoder`` (that step
replayed as CUDA graphs), which take the same ``(tokens (b, 1), cache) -> logits`` call and update the
same cache. Rows leave and join through ``HybridCache.select_rows`` / ``HybridCache.concat``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...model.cache import HybridCache
from ...model.lm import MambaMoEForCausalLM
from .request import Request, StreamEvent, TokenLogprob


class DecodeBatch:
    """Continuous batching over one model. Not thread-safe: one thread drives ``add`` and ``step``."""

    def __init__(self, model: MambaMoEForCausalLM, prefill_chunk: int = 512,
                 decoder: Callable[[Tensor, HybridCache], Tensor] | None = None) -> None:
        """``decoder``: the decode step ``(tokens (b, 1), cache) -> logits (b, V)`` (e.g. ``FastDecoder``);
        None = the model's own forward (the reference). Prefill always runs the model's forward."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be a positive integer (got {prefill_chunk!r})")
        self.model = model
        self.decoder = decoder
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
        return self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=1, router_stats=False).logits[:, -1]

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

    @staticmethod
    def _logprobs(logits: Tensor, rows: list[Request], tokens: list[int]) -> list[TokenLogprob | None]:
        """Each row's chosen token's log-probability (and its top alternatives) if the row asked for them."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return out
        index = torch.tensor(wanted, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        k = max(rows[i].params.logprobs for i in wanted)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))[:, 0].tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n], strict=True)))
        return out

    def _accept(self, logits: Tensor, rows: list[Request]) -> list[StreamEvent]:
        tokens = self._choose(logits, rows)
        logprobs = self._logprobs(logits, rows, tokens)
        return [r.accept(t, lp) for r, t, lp in zip(rows, tokens, logprobs, strict=True)]

    # ---- batch management ------------------------------------------------------------------------
    def _remaining(self, rows: list[Request]) -> int:
        """Key positions to reserve beyond the current ones: the most any row may still generate."""
        return max((r.remaining for r in rows), default=0)

    def add(self, requests: list[Request]) -> list[StreamEvent]:
        """Prefill ``requests`` and join them to the batch; returns their first events.

        New prompts are prefilled together on a fresh cache; a request with a ``start_cache`` (a chat
        continuing from its kept state) is prefilled alone on that cache, then merged like the others.
        """
        if not requests:
            return []
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"request {r.request_id}: empty prompt; give at least one token")
            if r.start_cache is not None and r.start_cache.batch_size != 1:
                raise ValueError(f"request {r.request_id}: start_cache holds {r.start_cache.batch_size} rows; "
                                 "a request continues one sequence")
        fresh = [r for r in requests if r.start_cache is None]
        events: list[StreamEvent] = []
        with torch.inference_mode():
            if fresh:
                cache = self.model.new_cache(len(fresh), device=self.device, dtype=self.dtype)
                cache.reserve(max(len(r.prompt_ids) for r in fresh) + self._remaining(fresh))
                events += self._join(self.prefill([r.prompt_ids for r in fresh], cache), cache, fresh)
            for r in requests:
                if r.start_cache is not None:
                    cache, r.start_cache = r.start_cache, None   # the batch owns it from here
                    cache.reserve(cache.seen_tokens + len(r.prompt_ids) + r.remaining)
                    events += self._join(self.prefill([r.prompt_ids], cache), cache, [r])
        return events

    def _join(self, logits: Tensor, cache: HybridCache, requests: list[Request]) -> list[StreamEvent]:
        """Sample the first tokens of freshly prefilled ``requests`` and merge their live rows into the batch."""
        events = self._accept(logits, requests)
        self._keep_finished(cache, requests)
        alive = [i for i, r in enumerate(requests) if not r.finished]
        if not alive:
            return events
        rows = [requests[i] for i in alive]
        if len(alive) < len(requests):
            cache = cache.select_rows(alive, cache.seen_tokens + self._remaining(rows))
        if self.cache is None:
            self.cache, self.rows = cache, rows
        else:
            merged = self.rows + rows
            reserve = max(self.cache.seen_tokens, cache.seen_tokens) + self._remaining(merged)
            self.cache = HybridCache.concat([self.cache, cache], reserve)
            self.rows = merged
        return events

    @staticmethod
    def _keep_finished(cache: HybridCache | None, rows: list[Request]) -> None:
        """Hand finished rows that asked for it (``keep_cache``) their own decode state, before they leave."""
        for i, r in enumerate(rows):
            if r.finished and r.keep_cache and r.final_cache is None and cache is not None:
                r.final_cache = cache.select_rows([i])

    def step(self) -> list[StreamEvent]:
        """Decode one token for every active request; finished ones leave the batch."""
        if not self.rows:
            return []
        with torch.inference_mode():
            tokens = torch.tensor([[r.output_ids[-1]] for r in self.rows], dtype=torch.long, device=self.device)
            if self.decoder is not None:
                logits = self.decoder(tokens, self.cache)
            else:
                logits = self._last_logits(tokens, None, self.cache)
            events = self._accept(logits, self.rows)
            self._keep_finished(self.cache, self.rows)
            self._drop_finished()
        return events

    def cancel(self, request_ids: set[int]) -> list[StreamEvent]:
        """Abort the given requests (those in this batch); returns their final events."""
        events = [r.cancel() for r in self.rows if r.request_id in request_ids and not r.finished]
        if events:
            with torch.inference_mode():
                self._keep_finished(self.cache, self.rows)
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
        self.cache = self.cache.select_rows(alive, self.cache.seen_tokens + self._remaining(self.rows))
