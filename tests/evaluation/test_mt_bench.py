"""MT-Bench-local: the judge's rating parser, FastChat's prompt assembly, the aggregate, and whole runs of a
toy model answering and judging itself (deterministic, resumable, answers kept when the judge changes).

The prompt and end-to-end tests read the real FastChat files in ../shared/data/mt_bench and skip without them.
"""

from __future__ import annotations

import json
import re
import string

import pytest
from helpers.serving import TOY_SEED
from helpers.toy import save_toy_checkpoint

from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.data import candidate_dirs
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.runner import run_eval
from mamba_moe.evaluation.tasks.mt_bench_judge import (
    JudgeTemplate,
    judge_fields,
    judge_messages,
    load_judge_templates,
    parse_rating,
    template_name,
)
from mamba_moe.evaluation.tasks.mt_bench_local import MTBenchLocal

TASK = "mt-bench-local"


def mt_bench_dir():
    for root in candidate_dirs():
        if (root / "mt_bench" / "question.jsonl").is_file():
            return root / "mt_bench"
    pytest.skip("../shared/data/mt_bench (FastChat's MT-Bench files) is absent")


# ---- the rating parser --------------------------------------------------------------------------

@pytest.mark.parametrize("reply, value", [
    ("The answer is helpful and accurate.\n\nRating: [[8]]", 8.0),
    ("Rating: [[10]]", 10.0),
    ("[[1]]", 1.0),
    ("Rating: [[7.5]]", 7.5),
    ("Rating: [[ 6 ]]", 6.0),
    ("Rating: [[5]] ... as I said, [[5]].", 5.0),              # the same rating twice is one rating
    ("Rating: [4]", 4.0),                                      # FastChat's fallback: single brackets
    ("See [1] and [2] for context. Rating: [[9]]", 9.0),       # [[n]] wins over citation-like [n]
])
def test_ratings_are_read(reply, value):
    rating = parse_rating(reply)
    assert rating.value == value and rating.failure is None


@pytest.mark.parametrize("reply, failure", [
    ("", "no rating"),
    (None, "no rating"),
    ("A fine answer. I would give it 8 out of 10.", "no rating"),
    ('Rating: "[[rating]]"', "no rating"),                      # the format echoed, no number
    ("Rating: [[7/10]]", "no rating"),
    ("Rating: [[-3]]", "no rating"),
    ("Rating: [[eight]]", "no rating"),
    ('Following the format "[[rating]]", for example: "Rating: [[5]]". My rating: [[3]]', "ambiguous: 3, 5"),
    ("Rating: [[11]]", "out of range: 11"),
    ("Rating: [[0]]", "out of range: 0"),
    ("Rating: [[1000000]]", "out of range: 1e+06"),
    ("[1] first point [2] second point", "ambiguous: 1, 2"),   # footnotes are not a rating
])
def test_replies_without_one_clear_rating_are_parse_failures(reply, failure):
    rating = parse_rating(reply)
    assert rating.value is None and rating.failure == failure


# ---- the judge's prompts ------------------------------------------------------------------------

def test_prompts_fill_exactly_fastchats_template_fields():
    templates = load_judge_templates(mt_bench_dir() / "judge_prompts.jsonl")
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(templates)
    questions = ["Q1 {answer} with braces", "Q2 second question"]
    answers = ["A1 says {question} literally", "A2 the second answer"]
    references = ["R1 reference one", "R2 reference two"]
    for category, has_reference in (("writing", False), ("math", True), ("coding", True), ("stem", False)):
        for turn in (1, 2):
            template = templates[template_name(category, turn)]
            assert template.output_format == "[[rating]]"
            fields = judge_fields(turn, questions, answers, references if has_reference else None)
            assert template.fields() <= set(fields)                       # every field of the template is given
            system, user = judge_messages(template, fields)
            assert system == ("system", template.system_prompt) and user[0] == "user"
            shown = questions[:turn] + answers[:turn] + (references[:turn] if has_reference else [])
            for text in shown:                                           # verbatim, braces and all
                assert user[1].count(text) == (2 if has_reference and turn == 2 and text in questions else 1)
            # nothing else is shown, and the template's own text is all there once the fields are blanked
            hidden = [t for t in questions + answers + references if t not in shown]
            assert not any(t in user[1] for t in hidden)
            literal = "".join(text for text, *_ in string.Formatter().parse(template.prompt_template))
            assert "".join(re.split("|".join(map(re.escape, shown)), user[1])) == literal


def test_a_reference_template_without_a_reference_is_an_error():
    template = JudgeTemplate("single-math-v1", "sys", "{question} {answer} {ref_answer_1}", "[[rating]]")
    with pytest.raises(EvalError, match="ref_answer_1"):
        judge_messages(template, judge_fields(1, ["q", "q2"], ["a"], None))


def test_the_task_judges_math_with_gpt4s_reference(tmp_path):
    data = mt_bench_dir()
    task = MTBenchLocal({"judge": "self"}, chat=True)
    task._load()
    math = next(q for q in task.questions if q["category"] == "math")
    writing = next(q for q in task.questions if q["category"] == "writing")
    refs = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"]
            for line in (data / "reference_answer_gpt-4.jsonl").read_text().splitlines()}
    judged = task._judge_item(math, 2, ["first answer", "second answer"])
    prompt = judged.request.messages[1][1]
    assert judged.meta["template"] == "single-math-v1-multi-turn" and judged.backend == "judge"
    assert refs[math["question_id"]][0] in prompt and refs[math["question_id"]][1] in prompt
    plain = task._judge_item(writing, 1, ["an answer"]).request.messages[1][1]
    assert "Reference" not in plain and writing["turns"][0] in plain


# ---- aggregation --------------------------------------------------------------------------------

def record(qid, category, turn, rating, failure=None):
    return {"meta": {"question_id": qid, "category": category, "turn": turn, "stage": "judge"},
            "verdict": {"rating": rating, "failure": failure}}


def test_aggregate_means_per_turn_and_category_and_counts_failures():
    task = MTBenchLocal({"judge": "self", "judge_name": "toy-judge"})
    records = [record(1, "writing", 1, 8.0), record(1, "writing", 2, 6.0), record(2, "math", 1, 2.0),
               record(2, "math", 2, None, "no rating"), record(3, "math", 1, 5.0), record(3, "math", 2, 3.0),
               {"meta": {"question_id": 1, "category": "writing", "turn": 1, "stage": "answer"},
                "verdict": {"score": None, "error": "prompt too long"}}]
    result = task.aggregate(records)
    assert result["title"] == "MT-Bench-local (judge: toy-judge)"
    assert result["value"] == pytest.approx((8 + 6 + 2 + 5 + 3) / 5) and result["n"] == 5
    assert result["judgments"] == 6 and result["parse_failures"] == 1
    assert result["failure_reasons"] == {"no rating": 1} and result["answer_errors"] == 1
    assert result["by_turn"]["1"]["value"] == pytest.approx(5.0) and result["by_turn"]["2"]["n"] == 2
    assert result["by_category"]["math"]["value"] == pytest.approx(10 / 3)
    assert result["by_category"]["writing"]["questions"] == 1
    assert result["by_category"]["writing"]["ci95"] == [None, None]      # one question: no interval claimed
    lo, hi = result["ci95"]
    assert 2.0 <= lo <= result["value"] <= hi <= 8.0


def test_missing_judge_or_data_is_a_clear_error(tmp_path):
    with pytest.raises(EvalError, match="needs a judge"):
        MTBenchLocal({})
    task = MTBenchLocal({"judge": "self", "data": str(tmp_path)})
    with pytest.raises(EvalError, match="question.jsonl is missing"):
        task._load()
    with pytest.raises(EvalError, match="mt_bench/question.jsonl: not found"):
        MTBenchLocal({"judge": "self"}, data_dir=str(tmp_path))._load()


# ---- whole runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_4k(tmp_path_factory):
    # a 4k context: the judge's multi-turn prompt with two answers is ~1.5k toy tokens
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy4k"), max_position_embeddings=4096, seed=TOY_SEED)


@pytest.fixture(scope="module")
def answerer(toy_4k, one_thread):
    return CheckpointBackend(toy_4k, dtype="float64", max_batch=4)


class Counting:
    """A backend that counts the requests it answers and raises KeyboardInterrupt at request ``fail_at``."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.requests = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests):
        if self.fail_at is not None and self.requests + len(requests) >= self.fail_at:
            raise KeyboardInterrupt
        self.requests += len(requests)
        return self.inner.generate(requests)


def samples(output):
    return [json.loads(line) for line in (output / "samples" / f"{TASK}.jsonl").read_text().splitlines()]


def run(backend, output, judge="self", **extra):
    mt_bench_dir()
    options = {TASK: {"judge": judge, "max_tokens": "6", "judge_max_tokens": "6", **extra}}
    return run_eval(backend, [TASK], output, limit=2, seed=1, chat=True, options=options, batch_size=1)


def test_a_toy_model_answers_and_judges_itself(answerer, tmp_path):
    counted = Counting(answerer)
    report = run(counted, tmp_path / "a")
    assert counted.requests == 8                                     # 2 questions x (2 answers + 2 judgments)
    entry = report["tasks"][TASK]
    name = answerer.info.model.rsplit("/", 1)[-1]
    assert entry["title"] == f"MT-Bench-local (judge: {name})" and entry["judgments"] == 4
    assert entry["n"] + entry["parse_failures"] == 4                 # a random model rarely writes [[n]]
    records = {r["id"]: r for r in samples(tmp_path / "a")}
    for qid in (81, 82):
        first, second = records[f"{TASK}/{qid}/answer/1"], records[f"{TASK}/{qid}/answer/2"]
        assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
        assert second["messages"][1]["content"] == first["output"].strip()   # turn 2 sees turn 1's answer
        judge_2 = records[f"{TASK}/{qid}/judge/2"]["messages"][1]["content"]
        assert first["output"].strip() in judge_2 and second["output"].strip() in judge_2
        assert records[f"{TASK}/{qid}/judge/1"]["meta"]["template"] == "single-v1"
    md = (tmp_path / "a" / "report.md").read_text()
    assert f"MT-Bench-local (judge: {name})" in md and not re.findall(r"MT-Bench(?!-local)", md)
    again = run(Counting(answerer), tmp_path / "b")
    assert [r["output"] for r in samples(tmp_path / "b")] == [r["output"] for r in samples(tmp_path / "a")]
    assert again["tasks"] == report["tasks"]                         # deterministic


def test_an_interrupted_run_resumes_and_a_new_judge_reuses_the_answers(answerer, toy_checkpoint, tmp_path):
    full = run(Counting(answerer), tmp_path / "full")
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(Counting(answerer, fail_at=6), out)                     # dies among the turn-1 judgments (round 2)
    assert len(samples(out)) == 5
    resumed = Counting(answerer)
    report = run(resumed, out)
    assert resumed.requests == 3 and report["tasks"] == full["tasks"]
    assert report["run"]["tasks"][TASK]["cached"] == 5

    # another judge (a different checkpoint, opened by the runner): the 4 answers are reused, 4 judgments made
    rejudged = Counting(answerer)
    report = run(rejudged, out, judge=str(toy_checkpoint), judge_name="other-toy", judge_max_tokens="5")
    assert rejudged.requests == 0                                    # the model under evaluation was not asked
    assert report["run"]["tasks"][TASK] == {**report["run"]["tasks"][TASK], "cached": 4, "computed": 4}
    assert report["tasks"][TASK]["title"] == "MT-Bench-local (judge: other-toy)"
    assert report["tasks"][TASK]["settings"]["judge_model"]["kind"] == "checkpoint"
