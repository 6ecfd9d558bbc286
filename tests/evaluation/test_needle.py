"""Multi-key needle: needles placed where the seed says, prompts sized to the length, the scorers on right
and wrong replies, a prompt-reading oracle at 100%, a one-needle memory below it, and the CLI on a toy."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
from helpers.serving import TOY_SEED

from mamba_moe.evaluation.backends.base import Backend, BackendInfo, GenResult
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.runner import run_eval
from mamba_moe.evaluation.tasks.needle import FILLER, INTRO, NEEDLE, WORDS, Needle, haystack, make_needles
from mamba_moe.evaluation.tasks.synthetic import score_all_integers


def eval_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mamba_moe", "eval", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MAMBA_MOE_EVAL_DATA": "/nonexistent"})


NEEDLE_RE = re.compile(r"The secret code for (\w+) is (\d+)\. ")


class WordCounter(Backend):
    """A backend whose tokens are whitespace-separated words; ``answer`` maps a prompt to the reply."""

    info = BackendInfo("fake", "word-counter")

    def __init__(self, answer, max_context=None):
        self.answer, self.max_context = answer, max_context

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, requests):
        return [GenResult(self.answer(r.prompt if r.prompt is not None else r.messages[-1][1])) for r in requests]


def asked_words(prompt):
    ask = prompt.rsplit("\n\n", 1)[1]
    return re.findall(r"\b(" + "|".join(WORDS) + r")\b", ask.split("?")[0])


def oracle(prompt):
    """Reads every needle off the prompt and answers what is asked, in the order asked."""
    codes = dict(NEEDLE_RE.findall(prompt))
    return " " + " ".join(codes[w] for w in asked_words(prompt)) + "."


def last_needle_only(prompt):
    """A model that keeps one number: the code of the needle it read last, whatever is asked."""
    return " " + NEEDLE_RE.findall(prompt)[-1][1]


def test_needles_are_seeded_distinct_and_placed_at_their_depths():
    seed = TOY_SEED
    needles = make_needles(seed, 512, 0.25, 0, 6)
    assert needles == make_needles(seed, 512, 0.25, 0, 6)
    assert needles != make_needles(seed + 1, 512, 0.25, 0, 6)
    assert needles[0][2] == 0.25 and all(0 <= d <= 1 for _, _, d in needles)
    assert len({w for w, _, _ in needles}) == 6 and len({c for _, c, _ in needles}) == 6
    assert all(10000 <= c <= 99999 for _, c, _ in needles)
    n = 40
    text = haystack(n, needles)
    assert text.count(FILLER) == n
    for word, code, depth in needles:
        sentence = NEEDLE.format(word=word, code=code)
        assert text.count(sentence) == 1
        before = text[:text.index(sentence)].count(FILLER)     # filler sentences before the needle
        assert before == round(depth * n)
    assert NEEDLE_RE.sub("", text) == FILLER * n                # nothing but filler and the needles


def test_edges_of_the_haystack():
    needles = [("apple", 11111, 0.0), ("river", 22222, 1.0), ("stone", 33333, 1.0)]
    text = haystack(3, needles)
    assert text.startswith(NEEDLE.format(word="apple", code=11111))
    assert text.endswith(FILLER + NEEDLE.format(word="river", code=22222) + NEEDLE.format(word="stone", code=33333))
    assert haystack(0, needles) == "".join(NEEDLE.format(word=w, code=c) for w, c, _ in needles)


@pytest.mark.parametrize("ask", ["one", "all"])
def test_prompts_fill_the_length_and_ask_the_right_keys(ask):
    backend = WordCounter(oracle, max_context=1500)
    task = Needle({"lengths": "300,1000,2000", "depths": "0,0.5,1", "ask": ask, "needles": "4"}, seed=TOY_SEED)
    items = task.items(backend, None)
    assert task.skipped == [2000] and len(items) == 6
    max_tokens = task.options["max_tokens"]
    assert max_tokens == (32 if ask == "all" else 8)
    for item in items:
        prompt, length = item.request.prompt, item.meta["length"]
        n = backend.count_tokens(prompt)
        per = backend.count_tokens(FILLER)
        assert length - max_tokens - per < n <= length - max_tokens, (n, length)   # as full as it can be
        assert prompt.startswith(INTRO)
        found = NEEDLE_RE.findall(prompt)
        assert len(found) == 4
        codes = dict((w, int(c)) for w, c in found)
        words = asked_words(prompt)
        assert [codes[w] for w in words] == (item.target if ask == "all" else [item.target])
        assert sorted(codes.values()) == sorted(item.meta["codes"])
    again = Needle({"lengths": "300,1000,2000", "depths": "0,0.5,1", "ask": ask}, seed=TOY_SEED).items(backend, None)
    assert [i.request for i in again] == [i.request for i in items]
    other = Needle({"lengths": "300,1000,2000", "depths": "0,0.5,1", "ask": ask}, seed=TOY_SEED + 1)
    assert [i.target for i in other.items(backend, None)] != [i.target for i in items]
    assert [i.id for i in task.items(backend, 4)] == [i.id for i in items[:4]]


def test_chat_prompts_and_option_errors():
    (item,) = Needle({"lengths": "200", "depths": "1"}, chat=True).items(WordCounter(oracle), None)
    assert item.request.messages[0][0] == "user" and item.request.messages[0][1].endswith("number only.")
    for options, field in [({"depths": "0.5,2"}, "needle.depths"), ({"needles": str(len(WORDS) + 1)}, "needle.needles"),
                           ({"ask": "some"}, "needle.ask"), ({"size": "3"}, "needle.size")]:
        with pytest.raises(EvalError, match=field):
            Needle(options)
    with pytest.raises(EvalError, match="needle.lengths=20"):
        Needle({"lengths": "20", "needles": "8"}).items(WordCounter(oracle), None)


def test_score_all_integers():
    outputs = [GenResult(" 12345 67890."), GenResult("12345, 67890 and then 11111"), GenResult(" 67890 12345"),
               GenResult(" 12345"), GenResult(""), GenResult("codes: abc"), GenResult(" 1234567890"),
               GenResult(" 12345 12345"), GenResult("12345 67890", "error", "refused")]
    verdicts = score_all_integers([[12345, 67890]] * len(outputs), outputs)
    assert [v["correct"] for v in verdicts] == [True, True, False, False, False, False, False, False, False]
    assert [v["hits"] for v in verdicts] == [2, 2, 0, 1, 0, 0, 0, 1, 0]
    assert verdicts[2]["extracted"] == [67890, 12345] and verdicts[-1]["error"] == "refused"
    assert score_all_integers([[]], [GenResult("1")])[0]["correct"] is False   # nothing asked is never right


def test_one_key_scoring_counts_confusions():
    task = Needle({"lengths": "200", "depths": "0.5", "needles": "3"}, seed=TOY_SEED)
    (item,) = task.items(WordCounter(oracle), None)
    right, other = item.meta["codes"][0], item.meta["codes"][1]
    outputs = [GenResult(f" {right}."), GenResult(f" {other}"), GenResult(" 5"), GenResult(""),
               GenResult(f" {right}", "error", "too long")]
    verdicts = task.score([item] * 5, outputs)
    assert [v["correct"] for v in verdicts] == [True, False, False, False, False]
    assert [v["confused"] for v in verdicts] == [False, True, False, False, False]
    result = task.aggregate([{"meta": item.meta, "verdict": v} for v in verdicts])
    assert result["value"] == pytest.approx(0.2) and result["confusions"] == 1 and result["by_depth"]["0.5"]["n"] == 5


@pytest.mark.parametrize("ask", ["one", "all"])
def test_oracle_scores_everything_and_one_needle_memory_does_not(ask, tmp_path):
    options = {"needle": {"lengths": "150,400", "depths": "0,0.5,1", "repeats": "3", "ask": ask}}
    report = run_eval(WordCounter(oracle), ["needle"], tmp_path / "oracle", seed=TOY_SEED, options=options)
    entry = report["tasks"]["needle"]
    assert entry["value"] == 1.0 and entry["n"] == 18
    assert all(v["value"] == 1.0 for v in [*entry["by_length"].values(), *entry["by_depth"].values()])
    assert set(entry["by_length"]) == {"150", "400"} and set(entry["by_depth"]) == {"0", "0.5", "1"}

    forgetful = run_eval(WordCounter(last_needle_only), ["needle"], tmp_path / "last", seed=TOY_SEED,
                         options=options)["tasks"]["needle"]
    records = [json.loads(line) for line in (tmp_path / "last" / "samples" / "needle.jsonl").read_text().splitlines()]
    # right exactly when one code is asked and it is the last needle in the prompt; never right for all four
    expected = [ask == "one" and NEEDLE_RE.findall(r["prompt"])[-1][1] == str(r["target"]) for r in records]
    assert [r["verdict"]["correct"] for r in records] == expected
    assert forgetful["value"] == pytest.approx(sum(expected) / 18) and forgetful["value"] < 1
    if ask == "one":
        assert forgetful["confusions"] == 18 - sum(expected)
        assert forgetful["by_depth"]["0"]["value"] == 0     # another needle always follows the asked one there
    else:
        # one number kept: it is the first code asked for exactly when the asked-first needle is read last
        hits = sum(NEEDLE_RE.findall(r["prompt"])[-1][1] == str(r["target"][0]) for r in records)
        assert forgetful["value"] == 0 and forgetful["codes_recalled"] == pytest.approx(hits / (4 * 18))


def test_eval_cli_on_a_toy_checkpoint(toy_checkpoint, tmp_path):
    out = tmp_path / "run"
    seed = random.Random(TOY_SEED).randrange(1000)
    done = eval_cli(str(toy_checkpoint), "--tasks", "needle", "--limit", "2", "--output", str(out), "--seed", str(seed),
                    "--set", "needle.lengths=400", "--set", "needle.depths=0,1", "--threads", "1", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needle: accuracy" in done.stdout and "(n=2)" in done.stdout
    entry = json.loads((out / "report.json").read_text())["tasks"]["needle"]
    assert entry["n"] == 2 and set(entry["by_depth"]) == {"0", "1"} and entry["by_length"]["400"]["n"] == 2
    assert entry["settings"]["needles"] == 4 and entry["settings"]["length_unit"] == "tokens"
    records = [json.loads(line) for line in (out / "samples" / "needle.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert len(NEEDLE_RE.findall(r["prompt"])) == 4
        assert r["verdict"]["correct"] == (r["verdict"]["extracted"] == r["target"])
