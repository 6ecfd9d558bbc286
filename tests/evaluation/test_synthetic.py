"""Passkey and MQAR: prompts sized and placed as asked, fixed by the seed, and scored right and wrong."""

from __future__ import annotations

import pytest

from mamba_moe.evaluation.backends.base import GenResult
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.tasks.mqar import MQAR
from mamba_moe.evaluation.tasks.passkey import INTRO, NEEDLE, QUESTION_BASE, Passkey
from mamba_moe.evaluation.tasks.synthetic import first_integer


@pytest.fixture(scope="module")
def backend(toy_checkpoint):
    return CheckpointBackend(toy_checkpoint)


def test_passkey_prompts_fill_the_length_and_place_the_needle(backend):
    task = Passkey({"lengths": "512,1000,2048", "depths": "0,0.5,1", "max_tokens": "8"}, seed=5)
    items = task.items(backend, None)
    assert task.skipped == [2048]                       # the toy's context is 1024
    assert len(items) == 6
    for item in items:
        n = backend.count_tokens(item.request.prompt)
        length = item.meta["length"]
        assert 0.8 * length <= n <= length - 8, (n, length)
        needle = NEEDLE.format(key=item.target)
        haystack = item.request.prompt[len(INTRO):-len(QUESTION_BASE)]
        at = haystack.index(needle) / (len(haystack) - len(needle))
        assert item.meta["filler"] >= 4
        assert abs(at - item.meta["depth"]) <= 1 / item.meta["filler"]   # placed to the nearest filler sentence
    assert [i.target for i in items] == [i.target for i in Passkey(task_options(task), seed=5).items(backend, None)]
    assert [i.target for i in items] != [i.target for i in Passkey(task_options(task), seed=6).items(backend, None)]


def task_options(task):
    return {"lengths": ",".join(map(str, task.options["lengths"])), "depths": "0,0.5,1", "max_tokens": "8"}


def test_passkey_scoring(backend):
    task = Passkey({"lengths": "128", "depths": "0.5"})
    (item,) = task.items(backend, None)
    key = item.target
    outputs = [GenResult(f" {key}. Remember"), GenResult(f" {key + 1}"), GenResult(""),
               GenResult("The key is unknown", "stop"), GenResult("", "error", "too long")]
    verdicts = task.score([item] * 5, outputs)
    assert [v["correct"] for v in verdicts] == [True, False, False, False, False]
    assert verdicts[4]["error"] == "too long"
    result = task.aggregate([{"meta": item.meta, "verdict": v} for v in verdicts])
    assert result["value"] == pytest.approx(0.2) and result["n"] == 5 and result["by_length"]["128"]["n"] == 5


def test_passkey_chat_and_bad_depths(backend):
    (item,) = Passkey({"lengths": "128", "depths": "1"}, chat=True).items(backend, None)
    assert item.request.messages[0][0] == "user" and "number only" in item.request.messages[0][1]
    with pytest.raises(EvalError, match="depths"):
        Passkey({"depths": "0.5,2"})


def test_mqar_contexts_and_scoring(backend):
    task = MQAR({"contexts": "3", "pairs": "6", "queries": "3"}, seed=1)
    items = task.items(backend, None)
    assert len(items) == 9
    for item in items:
        prompt = item.request.prompt
        key = prompt.rsplit("\n", 1)[1][:-1]
        assert f"\n{key}: {item.target}\n" in prompt     # the asked key's value is in the context
        assert prompt.count(f"\n{key}: ") == 1           # keys are distinct
    assert [i.request for i in items] == [i.request for i in MQAR(task_options_mqar(), seed=1).items(backend, None)]
    assert [i.request for i in items] != [i.request for i in MQAR(task_options_mqar(), seed=2).items(backend, None)]
    outputs = [GenResult(f" {i.target}") if k % 3 == 0 else GenResult(" 0") for k, i in enumerate(items)]
    verdicts = task.score(items, outputs)
    result = task.aggregate([{"meta": i.meta, "verdict": v} for i, v in zip(items, verdicts, strict=True)])
    assert result["value"] == pytest.approx(3 / 9) and result["contexts"] == 3
    assert result["interval"].startswith("bootstrap over contexts")
    zeros = task.aggregate([{"meta": i.meta, "verdict": {**v, "correct": False}} for i, v in zip(items, verdicts,
                                                                                                  strict=True)])
    assert zeros["value"] == 0 and zeros["ci95"][1] == pytest.approx(0.5615, abs=1e-4)   # Wilson 0 of 3 contexts
    with pytest.raises(EvalError, match="mqar.queries"):
        MQAR({"pairs": "2", "queries": "3"})


def task_options_mqar():
    return {"contexts": "3", "pairs": "6", "queries": "3"}


@pytest.mark.parametrize("text, value", [(" 123 is it", 123), ("none", None), ("", None), ("a1b22", 1)])
def test_first_integer(text, value):
    assert first_integer(text) == value
