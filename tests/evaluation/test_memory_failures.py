"""Why a model reader's answer is wrong (``memory_recall.failure``), and the per-kind counts the report gives."""

from __future__ import annotations

import pytest

from mamba_moe.evaluation.tasks.memory_recall import FAILURES, MemoryRecall, failure, judge
from mamba_moe.memory.slots import ABSTAIN

# A probe of the user's city, shown the user's fact, the sister's city, and the user's name.
PROMPT = [["city", "Oslo"], ["sister.city", "Lima"], ["name", "Søren"], ["employer", "Wayne Enterprises"]]


def _meta(slot="city", kind="recall", stale=(), forgotten=(), prompt=PROMPT):
    return {"slot": slot, "kind": kind, "stale": list(stale), "forgotten": list(forgotten), "distractors": [],
            "prompt_facts": prompt, "conversation": 0, "store_leaks": 0, "prompt_leaks": 0, "gold_in_prompt": True}


@pytest.mark.parametrize("answer,gold,meta,expected", [
    ("I don't know", "Oslo", _meta(), "abstained"),
    ("Bergen", "Oslo", _meta(kind="latest", stale=["Bergen"]), "stale"),
    ("Bergen", ABSTAIN, _meta(kind="latest", stale=["Bergen"]), "stale"),          # retracted, still answered
    ("Tallinn", ABSTAIN, _meta(kind="deleted", forgotten=["Tallinn"]), "leaked"),
    ("Lima", "Oslo", _meta(), "other_person"),                                     # the sister's city
    ("Lima", ABSTAIN, _meta(kind="abstain", prompt=PROMPT[1:]), "other_person"),   # a distractor, not abstaining
    ("Søren", "Oslo", _meta(), "other_attribute"),
    ("Wayne Enterprises", ABSTAIN, _meta(kind="abstain", prompt=PROMPT[1:]), "other_attribute"),
    ("Osl", "Oslo", _meta(), "garbled_copy"),                                      # a copy cut short
    ("Wayne", "Wayne Enterprises", _meta(slot="employer"), "garbled_copy"),        # one word of two
    ("2025-09-19", "2025-09-15", _meta(slot="dentist"), "garbled_copy"),
    ("Quito", "Oslo", _meta(), "not_in_prompt"),
    ("Quito", ABSTAIN, _meta(kind="abstain", prompt=PROMPT[1:]), "not_in_prompt"),
])
def test_failure_names_why_an_answer_is_wrong(answer, gold, meta, expected):
    assert expected in FAILURES
    assert failure(answer, gold, meta) == expected
    verdict = judge(answer, gold, meta)
    assert not verdict["correct"] and verdict["failure"] == expected


@pytest.mark.parametrize("answer,gold", [("oslo.", "Oslo"), ("I do not know", ABSTAIN), ("Unknown", ABSTAIN)])
def test_right_answers_have_no_failure(answer, gold):
    verdict = judge(answer, gold, _meta())
    assert verdict["correct"] and verdict["failure"] is None


def test_report_counts_failures_per_kind():
    cases = [("recall", "Oslo", "Oslo"), ("recall", "Oslo", "Lima"), ("recall", "Oslo", "I don't know"),
             ("recall", "Oslo", "Lima"), ("abstain", ABSTAIN, "Lima"), ("abstain", ABSTAIN, ABSTAIN),
             ("deleted", ABSTAIN, "Tallinn"), ("latest", "Oslo", "Bergen")]
    records = []
    for c, (kind, gold, answer) in enumerate(cases):
        meta = _meta(kind=kind, stale=["Bergen"] if kind == "latest" else (),
                     forgotten=["Tallinn"] if kind == "deleted" else ())
        meta["conversation"] = c % 2
        records.append({"meta": meta, "target": gold, "verdict": judge(answer, gold, meta)})
    report = MemoryRecall({"reader": "model"}).aggregate(records)
    assert report["failures"] == {"recall": {"abstained": 1, "other_person": 2}, "latest": {"stale": 1},
                                  "abstain": {"other_person": 1}, "deleted": {"leaked": 1}}
    assert report["value"] == 0.25 and report["deleted_leaks_in_answers"] == 1


@pytest.mark.parametrize("reader", ["model", "choice"])
def test_a_refused_request_is_an_error_not_a_reading_failure(reader):
    from mamba_moe.evaluation.backends.base import ChoiceRequest, ChoiceResult, GenRequest, GenResult
    from mamba_moe.evaluation.tasks.base import Item

    messages = (("system", "facts"), ("user", "Where do I live?"))
    if reader == "choice":
        request, refused = ChoiceRequest(messages, ("Oslo", ABSTAIN)), ChoiceResult((), (), "too long")
        answered = ChoiceResult((-0.1, -3.0), (2, 4))
    else:
        request, refused = GenRequest(messages=messages), GenResult("", "error", "too long")
        answered = GenResult("Oslo")
    items = [Item("a", request, "Oslo", _meta()), Item("b", request, "Oslo", _meta())]
    bad, good = MemoryRecall({"reader": reader}).score(items, [refused, answered])
    assert bad["failure"] == "error" and bad["error"] == "too long" and not bad["correct"]
    assert good["correct"] and good["failure"] is None and "error" not in good
