"""Passkey at 32k tokens on CPU: a whole run through the harness on a small model with a 32k context.

The model is the toy cut to two layers (Mamba2 + one attention layer with 2 heads), random weights: the
point is that the 32k item is built to size, prefilled through the engine and scored without running
out of memory or time, not the answer. About 13 s of CPU on one thread (the attention prefill is most of
it), hence ``slow``. The measured run of a real model at 32k belongs on the GPU (docs/evaluation.md §6).
"""

from __future__ import annotations

import json

import pytest
from helpers.serving import TOY_SEED
from helpers.toy import save_toy_checkpoint

from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.runner import run_eval

LENGTH = 32768


@pytest.mark.slow
def test_passkey_runs_at_32k_tokens_on_cpu(tmp_path, one_thread):
    path = save_toy_checkpoint(tmp_path / "toy-32k", seed=TOY_SEED, max_position_embeddings=LENGTH, n_layers=2,
                               layer_mixers=["mamba", "attention"], layer_ffns=["moe", "moe"], attn_num_heads=2,
                               attn_num_kv_heads=1)
    backend = CheckpointBackend(path)
    report = run_eval(backend, ["passkey"], tmp_path / "out",
                      options={"passkey": {"lengths": str(LENGTH), "depths": "0.5", "max_tokens": "8"}})
    entry = report["tasks"]["passkey"]
    assert entry["settings"]["skipped_lengths"] == [] and entry["n"] == 1
    assert list(entry["by_length"]) == [str(LENGTH)]
    lines = (tmp_path / "out" / "samples" / "passkey.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert "error" not in record and record["finish_reason"] in ("length", "stop")
    prompt_tokens = backend.count_tokens(record["prompt"])
    assert 0.98 * LENGTH <= prompt_tokens <= LENGTH - 8            # prompt + answer fill the 32k context
    assert entry["value"] in (0.0, 1.0) and entry["ci95"][0] is not None
