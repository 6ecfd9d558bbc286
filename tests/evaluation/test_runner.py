"""The runner: samples cached as they finish, an interrupted run resumes without recomputing them and
reports exactly what an uninterrupted run reports; torn cache lines and changed settings are handled."""

from __future__ import annotations

import json

import pytest

from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.cache import SampleCache
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.runner import parse_sets, run_eval

TASKS = ["gsm8k", "mqar", "passkey", "ppl"]


@pytest.fixture(scope="module")
def backend(toy_checkpoint, one_thread):
    # float64: greedy answers do not depend on which prompts share a batch (float32 ties could flip)
    return CheckpointBackend(toy_checkpoint, dtype="float64", max_batch=4)


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    docs = tmp_path_factory.mktemp("ppl") / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in [
        ("The quick brown fox jumps over the lazy dog. " * 12, "prose"), ("def f(x):\n    return x + 1\n" * 9, "code"),
        ("Hello! How are you today? I am fine.", "prose")]))
    return {"gsm8k": {"num_fewshot": "2", "max_tokens": "12"}, "mqar": {"contexts": "2", "pairs": "4", "queries": "2"},
            "passkey": {"lengths": "96,160", "depths": "0,1"}, "ppl": {"data": str(docs)}}


class Counting:
    """Wraps a backend, counting requests; raises KeyboardInterrupt on batch number ``fail_at`` (1-based)."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.batches, self.requests = inner, fail_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, n):
        self.batches += 1
        if self.fail_at is not None and self.batches == self.fail_at:
            raise KeyboardInterrupt
        self.requests += n

    def generate(self, requests):
        self._count(len(requests))
        return self.inner.generate(requests)

    def rolling_loglikelihood(self, texts):
        self._count(len(texts))
        return self.inner.rolling_loglikelihood(texts)


def run(backend, output, options, gsm8k_dir, **kwargs):
    return run_eval(backend, TASKS, output, limit=4, seed=3, options=options, data_dir=str(gsm8k_dir),
                    batch_size=2, **kwargs)


def test_interrupted_run_resumes_and_reports_the_same(backend, options, gsm8k_dir, tmp_path):
    fresh = Counting(backend)
    full = run(fresh, tmp_path / "fresh", options, gsm8k_dir)
    total = fresh.requests
    assert total == 4 + 4 + 4 + 3          # gsm8k 4, mqar 4 (2 contexts x 2), passkey 4 (2 lengths x 2), ppl 3

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run(Counting(backend, fail_at=4), out, options, gsm8k_dir)   # dies in mqar's 2nd batch
    cached = SampleCache(out / "samples" / "gsm8k.jsonl").load()
    assert len(cached) == 4 and len(SampleCache(out / "samples" / "mqar.jsonl").load()) == 2
    with open(out / "samples" / "mqar.jsonl", "ab") as fh:      # and a torn write from the kill
        fh.write(b'{"id": "mqar/1/0", "key": "trunc')

    resumed = Counting(backend)
    report = run(resumed, out, options, gsm8k_dir)
    assert resumed.requests == total - 6                          # 4 gsm8k + 2 mqar samples were not recomputed
    assert report["tasks"] == full["tasks"]
    assert report["run"]["tasks"]["gsm8k"] == {**report["run"]["tasks"]["gsm8k"], "cached": 4, "computed": 0}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"] == json.loads(json.dumps(full["tasks"]))
    lines = (out / "samples" / "mqar.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["id"].startswith("mqar/") for line in lines)

    again = Counting(backend)
    assert run(again, out, options, gsm8k_dir)["tasks"] == full["tasks"]
    assert again.requests == 0                                   # everything cached now


def test_a_larger_limit_extends_and_changed_settings_recompute(backend, options, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    run_eval(backend, ["gsm8k"], out, limit=2, seed=3, options=options, data_dir=str(gsm8k_dir))
    more = Counting(backend)
    report = run_eval(more, ["gsm8k"], out, limit=3, seed=3, options=options, data_dir=str(gsm8k_dir))
    assert more.requests == 1 and report["tasks"]["gsm8k"]["n"] == 3
    changed = Counting(backend)
    other = {"gsm8k": {**options["gsm8k"], "num_fewshot": "1"}}
    report = run_eval(changed, ["gsm8k"], out, limit=3, seed=3, options=other, data_dir=str(gsm8k_dir))
    assert changed.requests == 3 and report["tasks"]["gsm8k"]["settings"]["num_fewshot"] == 1


def test_report_contents(backend, options, gsm8k_dir, tmp_path):
    report = run(backend, tmp_path / "r", options, gsm8k_dir)
    for name in TASKS:
        entry = report["tasks"][name]
        assert entry["n"] > 0 and "settings" in entry and entry["metric"]
        lo, hi = entry["ci95"]
        assert lo is None or lo <= entry["value"] <= hi
    assert report["harness"]["mamba-moe"] and report["harness"]["torch"]
    assert report["model"]["kind"] == "checkpoint" and report["model"]["details"]["dtype"] == "float64"
    assert set(report["tasks"]["ppl"]["domains"]) == {"prose", "code"}
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| gsm8k | exact_match |" in md and "95% interval" in md
    records = [json.loads(line) for line in (tmp_path / "r" / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert all({"prompt", "output", "verdict", "target"} <= set(r) for r in records)


def test_option_errors_name_the_option():
    with pytest.raises(EvalError, match="--set gsm8k.shots: unknown option"):
        from mamba_moe.evaluation.tasks.gsm8k import GSM8K

        GSM8K({"shots": "5"})
    with pytest.raises(EvalError, match="expected TASK.OPTION=VALUE"):
        parse_sets(["gsm8k=5"], ["gsm8k"])
    with pytest.raises(EvalError, match="not among --tasks"):
        parse_sets(["mqar.pairs=4"], ["gsm8k"])
    with pytest.raises(EvalError, match="passkey.lengths=abc"):
        from mamba_moe.evaluation.tasks.passkey import Passkey

        Passkey({"lengths": "abc"})


def test_missing_data_names_the_file_and_the_override(backend, tmp_path):
    with pytest.raises(EvalError, match=r"gsm8k/test.jsonl: not found .*--data-dir"):
        run_eval(backend, ["gsm8k"], tmp_path / "x", data_dir=str(tmp_path / "nowhere"))
