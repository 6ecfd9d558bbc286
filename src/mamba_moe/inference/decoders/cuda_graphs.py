"""CUDA-graph decode: the model's decode step (``MambaMoEForCausalLM.step`` of ``fast_decode.FastDecoder``'s
packed model) captured once per batch-size bucket.

Why: on a GPU a batch-1 decode step of a 24-layer hybrid is a few hundred small kernels, and launching
them from Python costs more than running them. A CUDA graph replays the whole step with one launch.

A graph replays fixed kernels on fixed addresses, so everything the step touches lives in static
buffers, one set per bucket (batch sizes 1, 2, 4, 8, ... up to ``max_batch``; a batch of b rows runs in
the smallest bucket >= b, the extra rows being padding whose results are ignored):

- the input tokens, the RoPE positions and the column ``t`` where this step's keys go (a tensor, so
  that the captured ``index_copy_`` writes the next column on every replay; the step advances it);
- Mamba conv/SSM states (updated in place by the step);
- attention keys/values for the whole context (``max_context`` positions) and a key-validity mask over
  them: attention always runs over the full buffer with future and padding positions masked, so its
  shapes never change;
- the logits.

The engine's cache stays the source of truth between batch changes: when rows join or leave
(``HybridCache.select_rows`` / ``concat`` build a new cache), its contents are copied into the
bucket's buffers once and the cache's tensors are re-pointed at views of them; each decode step is
then one ``replay``. Eager
``FastDecoder`` stays the reference (tests/inference/test_gpu.py: same greedy tokens, logits within
tolerance) and runs whatever does not fit (batch above the largest bucket, context full). Every router is
captured: packed experts take top-k and Switch weights without data-dependent shapes, and Switch capacity
is counted on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...model.cache import HybridCache, KVState, MambaState
from ...model.ffn import ExpertBank
from ...model.lm import MambaMoEForCausalLM
from .fast_decode import FastDecoder


class _StaticKV:
    """An attention layer's decode state inside a graph (a ``KeyValueStore``): ``append`` writes at the
    column held in ``index``."""

    def __init__(self, key: Tensor, value: Tensor, index: Tensor) -> None:
        self.key, self.value, self.index = key, value, index

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key.index_copy_(2, self.index, key)
        self.value.index_copy_(2, self.index, value)
        return self.key, self.value


class _Bucket:
    """Static buffers and the captured graph for one batch size."""

    def __init__(self, model: MambaMoEForCausalLM, template: HybridCache, size: int, context: int,
                 pool: object) -> None:
        device = template.positions.device
        self.size, self.context = size, context
        self.tokens = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(size, context, dtype=torch.bool, device=device)
        self.states: list[MambaState | _StaticKV] = []
        for state in template.layers:
            if isinstance(state, MambaState):
                self.states.append(MambaState(conv=state.conv.new_zeros(size, *state.conv.shape[1:]),
                                              ssm=state.ssm.new_zeros(size, *state.ssm.shape[1:])))
            elif isinstance(state, KVState):
                k, v = state.key, state.value
                self.states.append(_StaticKV(k.new_zeros(size, k.shape[1], context, k.shape[3]),
                                             v.new_zeros(size, v.shape[1], context, v.shape[3]), self.index))
            else:
                raise ValueError(f"cuda graphs: unsupported layer state {type(state).__name__}")
        self.model = model
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, kernel selection)
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._step()

    def _step(self) -> Tensor:
        self.key_valid.index_fill_(1, self.index, True)
        logits = self.model.step(self.tokens, self.positions, self.key_valid, self.states)
        self.positions.add_(1)
        self.index.add_(1)
        return logits

    def load(self, cache: HybridCache) -> None:
        """Copy ``cache`` (b <= size rows, t keys) into the buffers and point its tensors at them.

        Rows b.. are padding (zero state, no valid keys). Copies go row-block by row-block, so a cache
        that already views these buffers is copied onto itself, harmlessly.
        """
        b, t = cache.batch_size, cache.seen_tokens
        self.positions[:b].copy_(cache.positions)
        self.positions[b:].zero_()
        self.tokens[b:].zero_()
        self.index.fill_(t)
        self.key_valid[:b, :t].copy_(cache.key_mask)
        self.key_valid[:b, t:].zero_()
        self.key_valid[b:].zero_()
        for i, (mine, theirs) in enumerate(zip(self.states, cache.layers, strict=True)):
            if isinstance(mine, MambaState):
                mine.conv[:b].copy_(theirs.conv)
                mine.ssm[:b].copy_(theirs.ssm)
                mine.conv[b:].zero_()
                mine.ssm[b:].zero_()
                cache.layers[i] = MambaState(conv=mine.conv[:b], ssm=mine.ssm[:b])
            else:
                mine.key[:b, :, :t].copy_(theirs.key)
                mine.value[:b, :, :t].copy_(theirs.value)
        self.expose(cache)

    def expose(self, cache: HybridCache) -> None:
        """Make ``cache`` (b rows, t + 1 keys after a step) views of the buffers, as eager decode leaves it."""
        b = cache.batch_size
        t = int(cache.key_mask.shape[1])
        for i, mine in enumerate(self.states):
            if isinstance(mine, _StaticKV):
                kv = KVState(key=mine.key[:b, :, :t], value=mine.value[:b, :, :t],
                             _key_buffer=mine.key[:b], _value_buffer=mine.value[:b])
                cache.layers[i] = kv
        cache.positions = self.positions[:b]
        cache.key_mask = self.key_valid[:b, :t]


class GraphDecoder:
    """``(tokens (b, 1), cache) -> logits (b, V)`` by replaying captured CUDA graphs; see the module docstring.

    ``max_context``: key positions each bucket holds (prompt + output); ``max_batch``: the largest bucket.
    """

    def __init__(self, decoder: FastDecoder, max_context: int, max_batch: int = 64) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda-graphs decoding needs a CUDA device")
        if any(isinstance(m, ExpertBank) for m in decoder.model.modules()):
            raise ValueError("cuda-graphs decoding: needs packed experts (a FastDecoder's model); per-expert "
                             "dispatch has data-dependent shapes")
        self.decoder = decoder
        self.max_context = max_context
        self.sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None
        self._cache: HybridCache | None = None     # the cache whose tensors are views of a bucket
        self._bucket: _Bucket | None = None
        self._seen = -1
        self.replays = 0                           # decode steps served by a graph (the rest ran eager)
        self.loads = 0                             # batch changes copied into a bucket

    def bucket_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def __call__(self, tokens: Tensor, cache: HybridCache) -> Tensor:
        b, t = cache.batch_size, cache.seen_tokens
        size = self.bucket_for(b)
        if size is None or t + 1 > self.max_context or not cache.positions.is_cuda:
            self._cache = None
            return self.decoder(tokens, cache)                       # eager fallback (the same step)
        if size not in self.buckets:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            self.buckets[size] = _Bucket(self.decoder.model, cache, size, self.max_context, self.pool)
            self._cache = None
        bucket = self.buckets[size]
        if cache is not self._cache or bucket is not self._bucket or t != self._seen:
            bucket.load(cache)
            self.loads += 1
            self._cache, self._bucket = cache, bucket
        bucket.tokens[:b].copy_(tokens)
        bucket.graph.replay()
        self.replays += 1
        cache.key_mask = bucket.key_valid[:b, :t + 1]
        bucket.expose(cache)
        self._seen = t + 1
        return bucket.logits[:b].clone()
