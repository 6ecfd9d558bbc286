"""HybridCache's own operations: the preallocated key mask, reserving, dropping and merging rows.

The reference for each is the model itself: a cache reshaped by ``select_rows`` / ``concat`` must continue
every row exactly as a cache that held that row alone (float64, fresh random weights and prompts).
"""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.model.cache import HybridCache, KVState, MambaState


@pytest.fixture(scope="module")
def model() -> MambaMoEForCausalLM:
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_router="topk")).double().eval()


def alone(model: MambaMoEForCausalLM, prompt: torch.Tensor) -> HybridCache:
    cache = model.new_cache(1)
    with torch.no_grad():
        model(prompt[None], cache=cache)
    return cache


def next_logits(model: MambaMoEForCausalLM, cache: HybridCache, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(tokens[:, None], cache)


def test_extend_key_mask_reuses_one_buffer_and_notices_outside_assignment():
    cache = HybridCache([], 2, torch.device("cpu"))
    cache.extend_key_mask(torch.tensor([[True, False], [True, True]]))
    pointers = {cache.extend_key_mask().data_ptr() for _ in range(62)}
    assert len(pointers) <= 6                  # the buffer doubles when full: not a new tensor per token
    mask = cache.key_mask
    assert mask.shape == (2, 64) and mask[0].tolist() == [True, False] + [True] * 62 and bool(mask[1].all())
    cache.key_mask = torch.tensor([[False], [True]])                     # assigned from outside (graph decode)
    assert cache.extend_key_mask().tolist() == [[False, True], [True, True]]
    assert cache.seen_tokens == 2


def test_reserve_keeps_keys_and_grows_capacity(model):
    cache = alone(model, torch.randint(4, 512, (5,)))
    kv = [s for s in cache.layers if isinstance(s, KVState)]
    before = [s.key.clone() for s in kv]
    cache.reserve(40)
    assert all(s.capacity >= 40 for s in kv) and cache.key_capacity() >= 40
    assert all(torch.equal(s.key, b) for s, b in zip(kv, before, strict=True))


def test_concat_then_select_rows_continue_each_row_as_if_alone(model):
    prompts = [torch.randint(4, 512, (n,)) for n in (3, 8, 5)]
    caches = [alone(model, p) for p in prompts]
    merged = HybridCache.concat([alone(model, p) for p in prompts], reserve=20)
    assert merged.batch_size == 3 and merged.seen_tokens == 8           # shorter rows left-padded
    assert merged.key_mask.sum(1).tolist() == [3, 8, 5]
    tokens = torch.randint(4, 512, (3,))
    out = next_logits(model, merged, tokens)
    for i, cache in enumerate(caches):
        assert rel_error(out[i], next_logits(model, cache, tokens[i:i + 1])[0]) < 1e-12
    # Keep rows 2 and 0 (in that order): the leading key column no kept row uses is trimmed.
    kept = merged.select_rows([2, 0], reserve=merged.seen_tokens + 4)
    assert kept.batch_size == 2 and kept.seen_tokens == 6 and kept.positions.tolist() == [6, 4]
    tokens = torch.randint(4, 512, (2,))
    out = next_logits(model, kept, tokens)
    assert rel_error(out[0], next_logits(model, caches[2], tokens[0:1])[0]) < 1e-12
    assert rel_error(out[1], next_logits(model, caches[0], tokens[1:2])[0]) < 1e-12
    mamba = [s for s in kept.layers if isinstance(s, MambaState)]
    assert mamba and all(s.ssm.shape[0] == 2 for s in mamba)


def test_clone_is_an_independent_snapshot(model):
    """Decoding on a clone leaves the original untouched: both continue as the original would have."""
    cache = alone(model, torch.randint(4, 512, (6,)))
    snapshot = cache.clone()
    tokens = torch.randint(4, 512, (1, 3))
    first = [next_logits(model, cache, tokens[:, i]) for i in range(3)]
    again = [next_logits(model, snapshot, tokens[:, i]) for i in range(3)]   # the branch replays the same turn
    assert all(rel_error(a, b) < 1e-12 for a, b in zip(first, again, strict=True))
    assert cache.seen_tokens == snapshot.seen_tokens == 9


def test_concat_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        HybridCache.concat([])
