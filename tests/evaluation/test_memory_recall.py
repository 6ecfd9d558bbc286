"""The memory task end to end: held-out conversations replayed through the store, probes answered and scored."""

from __future__ import annotations

import json
import re

import pytest

from mamba_moe.data import memory_dialogues as md
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.runner import run_eval
from mamba_moe.evaluation.tasks import task_class
from mamba_moe.evaluation.tasks.memory_recall import MemoryRecall
from mamba_moe.memory.extract import Extractor, confirm_with_model

ABSTAIN_FORMS = {"i don't know", "i do not know"}


@pytest.fixture(scope="module")
def backend(toy_checkpoint):
    return CheckpointBackend(toy_checkpoint)


def _norm(text):
    return " ".join(text.strip().split("\n")[0].split()).rstrip(".!").casefold()


def _names(answer, value):
    return re.search(r"(?<![\w-])" + re.escape(_norm(value)) + r"(?![\w-])", _norm(answer)) is not None


def _expected(records, probes):
    """The report's numbers recomputed from the raw answers and the generator's gold, with none of the task's code."""
    by_kind = {}
    for record, probe in zip(records, probes, strict=True):
        answer, gold = _norm(record["verdict"]["answer"]), _norm(probe.answer)
        right = answer in ABSTAIN_FORMS if gold in ABSTAIN_FORMS else answer == gold
        stale = not right and any(_names(answer, v) for v in probe.stale)
        by_kind.setdefault(probe.kind, []).append((right, stale))

    def share(kind, i=0):
        rows = by_kind.get(kind, [])
        return sum(r[i] for r in rows) / len(rows) if rows else None

    return {"recall": share("recall"), "latest": share("latest"), "stale_rate": share("latest", 1),
            "abstention": share("abstain"), "deleted": share("deleted")}


@pytest.mark.slow
def test_oracle_reader_end_to_end(backend, tmp_path, fresh_seed):
    seed = fresh_seed % 1000
    options = {"memory": {"conversations": "2", "sessions": "10"}}
    report = run_eval(backend, ["memory"], tmp_path, seed=seed, options=options)
    entry = report["tasks"]["memory"]
    records = [json.loads(line) for line in (tmp_path / "samples" / "memory.jsonl").read_text().splitlines()]
    conversations = md.generate(md.EVAL_SEEDS.start + seed, 2, split="eval", config=md.DialogueConfig(sessions=10))
    probes = [p for c in conversations for p in c.probes]
    assert [r["target"] for r in records] == [p.answer for p in probes]       # gold straight from the generator
    assert all(r["max_tokens"] == 1 for r in records)                         # the oracle does not ask the model
    expected = _expected(records, probes)
    assert entry["value"] == expected["recall"] and entry["n"] == sum(p.kind == "recall" for p in probes)
    for name in ("latest", "stale_rate", "abstention", "deleted"):
        assert entry[name]["value"] == expected[name], name
    assert entry["deleted_leaks"] == 0
    leaked = sum(any(_names(r["verdict"]["answer"], v) for v in p.forgotten)
                 for r, p in zip(records, probes, strict=True))
    assert entry["deleted_leaks_in_answers"] == leaked == 0
    # lengths measured in the model's tokens against its context (the toy's: 1024)
    assert entry["token_unit"] == "model tokens" and entry["max_context"] == backend.max_context
    assert entry["conversation_tokens"]["min"] > backend.max_context and entry["overflowing"] == 1.0
    assert entry["settings"]["eval_seed"] == md.EVAL_SEEDS.start + seed
    # a rerun reads every sample back from the cache and reports the same
    again = run_eval(backend, ["memory"], tmp_path, seed=seed, options=options)
    assert again["run"]["tasks"]["memory"]["computed"] == 0
    assert again["tasks"]["memory"]["value"] == entry["value"]


@pytest.mark.slow
def test_model_reader_prompts_with_retrieved_facts(backend, tmp_path, fresh_seed):
    seed = fresh_seed % 1000
    report = run_eval(backend, ["memory"], tmp_path, seed=seed, chat=True,
                      options={"memory": {"conversations": "1", "sessions": "6", "reader": "model",
                                          "max_tokens": "4"}})
    entry = report["tasks"]["memory"]
    records = [json.loads(line) for line in (tmp_path / "samples" / "memory.jsonl").read_text().splitlines()]
    (conversation,) = md.generate(md.EVAL_SEEDS.start + seed, 1, split="eval", config=md.DialogueConfig(sessions=6))
    for record, probe in zip(records, conversation.probes, strict=True):
        system, user = record["messages"]
        assert system["role"] == "system" and user == {"role": "user", "content": probe.question}
        facts = system["content"].split("\n")
        if probe.kind == "recall":                                       # the stored fact is in the prompt
            assert any(_names(fact, probe.answer) for fact in facts)
        for value in probe.forgotten:                                    # a deleted fact never is
            assert not any(_names(fact, value) for fact in facts)
        assert record["verdict"]["answer"] == record["output"]           # scored on the model's own answer
    assert entry["value"] == _expected(records, conversation.probes)["recall"]


def test_options_and_held_out_seeds():
    with pytest.raises(EvalError, match="memory.reader=judge"):
        MemoryRecall({"reader": "judge"})
    assert task_class("memory") is MemoryRecall
    task = MemoryRecall({"conversations": "2", "sessions": "5"}, seed=3)
    conversations = task.conversations()
    assert all(c.split == "eval" and c.seed in md.EVAL_SEEDS for c in conversations)
    train = md.generate(3, 2, config=md.DialogueConfig(sessions=5))
    assert [c.messages() for c in conversations] != [c.messages() for c in train]


def test_model_confirmation_uses_the_models_own_scores(backend):
    message = "I live in Oslo and my favourite colour is blue."
    proposed = Extractor().extract(message, now="2026-03-04T10:00:00Z")

    def loglikelihood(pairs):
        return [r.logprob for r in backend.loglikelihood(pairs)]

    kept = confirm_with_model(message, proposed, loglikelihood)
    for op in proposed:
        context = f"Message: {message}\nDoes this message state, as true now, that {op.text} Answer yes or no.\nAnswer:"
        yes, no = (r.logprob for r in backend.loglikelihood([(context, " yes"), (context, " no")]))
        assert (op in kept) == (yes > no)
