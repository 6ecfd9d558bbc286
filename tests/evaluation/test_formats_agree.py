"""One model, four forms, the same greedy GSM8K and HumanEval answers (hence scores): our checkpoint, its GGUF
export at f32 through llama-cpp-python, its HF export through transformers, and a real ``mamba-moe serve``.

The checkpoint runs in float64 and is the reference; the server too (the serving helper's float64), so its
answers must be equal on every sample. The HF export (transformers' MoE kernels take no float64) and the
GGUF file run in float32, whose logits differ from float64 by ~1e-6: a greedy step whose top two logits lie
closer than ``NEAR_TIE`` in the reference may legitimately go either way, so such a sample is left out of the
float32 comparisons (and counted; about one run in three has one or two). Plain prompts are what is
compared (base mode): the GGUF backend decodes them token by token with llama.cpp's sampler and does stops,
limits and text decoding as the engine does (``backends/gguf.py`` says why ``create_completion`` does not).
"""

from __future__ import annotations

import json

import pytest
from helpers.numerics import greedy_margin
from helpers.serving import TOY_SEED, running_server
from helpers.toy import save_toy_checkpoint

from mamba_moe.evaluation.backends import open_backend
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.runner import run_eval
from mamba_moe.evaluation.tasks import task_class

NEAR_TIE = 1e-3   # logits; float32 vs float64 differ by ~1e-6 here
LIMIT = 2
OPTIONS = {"gsm8k": {"num_fewshot": "1", "max_tokens": "24"}, "humaneval": {"max_tokens": "24", "timeout": "20"}}
TASKS = ["gsm8k", "humaneval"]


def samples(output, task):
    return [json.loads(line) for line in (output / "samples" / f"{task}.jsonl").read_text().splitlines()]


def near_ties(reference, task, gsm8k_dir):
    """Ids of the samples whose greedy path (prompt, answer, and the step that ended it) has a top-two
    logit gap below NEAR_TIE in the float64 reference."""
    built = task_class(task)(OPTIONS[task], seed=1, data_dir=str(gsm8k_dir))
    return {item.id for item in built.items(reference, LIMIT)
            if greedy_margin(reference, item.request) < NEAR_TIE}


@pytest.mark.slow
def test_checkpoint_gguf_hf_and_server_give_the_same_greedy_answers(gsm8k_dir, tmp_path, one_thread):
    pytest.importorskip("openai")
    # 2k context: no HumanEval prompt + answer reaches its end (llama-cpp-python cannot fill n_ctx exactly)
    toy_checkpoint = save_toy_checkpoint(tmp_path / "toy", max_position_embeddings=2048, seed=TOY_SEED)
    pytest.importorskip("uvicorn")
    from mamba_moe.export.gguf_export import export_gguf
    from mamba_moe.export.hf_export import export_hf

    export_hf(toy_checkpoint, tmp_path / "hf")
    forms = {"hf": lambda: open_backend(str(tmp_path / "hf"), dtype="float32")}
    try:
        import llama_cpp  # noqa: F401

        export_gguf(toy_checkpoint, tmp_path / "toy-f32.gguf", type="f32")
        forms["gguf"] = lambda: open_backend(str(tmp_path / "toy-f32.gguf"), n_ctx=2048, threads=1)
    except ImportError:
        print("llama-cpp-python is not installed: the GGUF form is not compared")
    kwargs = {"limit": LIMIT, "seed": 1, "options": OPTIONS, "data_dir": str(gsm8k_dir)}

    reference = CheckpointBackend(toy_checkpoint, dtype="float64")
    expected = run_eval(reference, TASKS, tmp_path / "checkpoint", **kwargs)
    ties = {task: near_ties(reference, task, gsm8k_dir) for task in TASKS}
    print(f"near ties left out of the float32 comparisons: {ties}")

    compared_counts: dict[str, int] = {}
    with running_server(toy_checkpoint) as (url, _):
        forms["server"] = lambda: open_backend(f"openai:{url}")
        for name, opener in forms.items():
            backend = opener()
            got = run_eval(backend, TASKS, tmp_path / name, **kwargs)
            backend.close()
            for task in TASKS:
                ours, theirs = samples(tmp_path / "checkpoint", task), samples(tmp_path / name, task)
                assert [r["id"] for r in ours] == [r["id"] for r in theirs]
                assert [r.get("prompt") for r in ours] == [r.get("prompt") for r in theirs]
                skip = set() if name == "server" else ties[task]
                compared = [(a, b) for a, b in zip(ours, theirs, strict=True) if a["id"] not in skip]
                compared_counts[name] = compared_counts.get(name, 0) + len(compared)
                for a, b in compared:
                    assert b["output"] == a["output"], f"{name} {task} {a['id']}"
                    assert b["verdict"]["score"] == a["verdict"]["score"], f"{name} {task} {a['id']}"
                if not skip:
                    assert got["tasks"][task]["value"] == expected["tasks"][task]["value"]
    print(f"samples compared: {compared_counts}")
    assert compared_counts["server"] == compared_counts["hf"] + sum(len(t) for t in ties.values()) == 2 * LIMIT
    if compared_counts["hf"] == 0:
        pytest.skip(f"every sample of this seed has a near tie in float64 ({ties}): nothing to compare in float32")
