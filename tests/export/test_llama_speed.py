"""The llama.cpp speed probe (``export/llama_speed.py``, used by ``bench/export_decode.py``) decodes what it says
it decodes: greedy tokens continuing the prompt, from a restored state exactly as from a fresh prefill. Its
numbers are only checked for shape (timings are never asserted)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mamba_moe.export.llama_speed import _greedy_decode, _SavedState, measure


def test_decoding_from_a_restored_state_is_greedy_decoding_of_the_prompt(exported, llama_runner, llama_cpp, seed):
    path = exported("flagship", seed, "f32")
    runner = llama_runner(path)
    prompt = np.random.default_rng(seed).integers(4, runner.llm.n_vocab(), 40).tolist()
    expected, rows = runner.greedy(prompt, 6)              # argmax of the logits_all scores, the reference
    # Two llama.cpp contexts (other batch sizes) round differently, ~1e-6: compare only up to the first step
    # whose top two logits are closer than 1e-3, where either choice is right (a random model has a few).
    top2 = np.sort(rows, axis=1)[:, -2:]
    steps = next((i for i, (second, first) in enumerate(top2) if first - second < 1e-3), len(expected))
    expected = expected[:steps]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(prompt)
        saved = _SavedState(llama_cpp, llm)
        for _ in range(3):                                  # the state survives decoding past it, twice
            saved.restore(llm)
            chosen: list[int] = []
            _greedy_decode(llama_cpp, llm, saved.next_token, 6, chosen)
            assert chosen[:steps] == expected
            assert llm.n_tokens == len(prompt) + 6
    finally:
        llm.close()


def test_measure_gives_a_row_per_context_and_thread_count(exported, llama_cpp, seed):
    rows = measure(exported("flagship", seed, "f32"), contexts=(24, 8), threads=(1, 2), new_tokens=3, repeats=2)
    assert [(r.context, r.threads, r.prefill_from) for r in rows] == [(8, 1, 0), (8, 2, 0), (24, 1, 8), (24, 2, 8)]
    for row in rows:
        assert len(row.decode_tok_s) == 2 and row.new_tokens == 3
        assert all(math.isfinite(v) and v > 0 for v in [*row.decode_tok_s, row.prefill_tok_s, row.decode_median])
        assert math.isfinite(row.load_1min) and f"context {row.context}" in row.summary()


def test_measure_runs_with_a_quantized_cache_under_flash_attention(exported, llama_cpp, seed):
    rows = measure(exported("flagship", seed, "f32"), contexts=(16,), threads=(1,), new_tokens=3, repeats=1,
                   flash_attn=True, cache_type="q8_0")
    assert len(rows) == 1 and all(math.isfinite(v) and v > 0 for v in rows[0].decode_tok_s)


def test_a_quantized_cache_without_flash_attention_or_an_unknown_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="flash attention"):
        measure(tmp_path / "never-opened.gguf", cache_type="q8_0")
    with pytest.raises(ValueError, match="cache_type: 'q3'"):
        measure(tmp_path / "never-opened.gguf", flash_attn=True, cache_type="q3")
