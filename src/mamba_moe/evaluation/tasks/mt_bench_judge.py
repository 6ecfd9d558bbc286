"""The MT-Bench single-answer judge, as FastChat's ``llm_judge`` asks it: the prompts and the rating parser.

FastChat grades each turn of each answer on its own (``single-v1`` for the first turn, ``single-v1-multi-turn``
for the second, which shows the judge the whole conversation and asks about the second answer). For the
categories where correctness decides (math, reasoning, coding) it uses the ``single-math-v1`` pair instead,
which also shows GPT-4's reference answer (``reference_answer_gpt-4.jsonl``). The judge's reply must hold the
rating as ``[[n]]``.

Parsing, stricter than FastChat's (which takes the first ``[[n]]``, else the first ``[n]``, else scores -1):
the ratings written ``[[n]]`` (``[n]`` only when there is no ``[[n]]``) must agree and lie in 1..10. A reply
with none, with two different ones ("Rating: [[5]]" quoted from the instructions, then "[[3]]"), or with
one out of range is a *parse failure*: counted and reported, never scored as 0 or as anything else.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import read_jsonl
from ..errors import EvalError

# FastChat's NEED_REF_CATS (fastchat/llm_judge/common.py) without arena-hard-200, which MT-Bench does not have
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})
MIN_RATING, MAX_RATING = 1.0, 10.0
_NUMBER = r"\s*(\d+(?:\.\d*)?)\s*"
RATING_RE = re.compile(r"\[\[" + _NUMBER + r"\]\]")
BACKUP_RE = re.compile(r"\[" + _NUMBER + r"\]")


@dataclass(frozen=True)
class JudgeTemplate:
    """One entry of ``judge_prompts.jsonl``: the judge's system prompt and the user prompt to fill in."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str

    def fields(self) -> set[str]:
        """The ``{name}`` fields of the user prompt."""
        return {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name}


def load_judge_templates(path: str | Path) -> dict[str, JudgeTemplate]:
    """The single-answer templates of ``judge_prompts.jsonl`` by name; a missing field names the line."""
    out = {}
    for i, record in enumerate(read_jsonl(path), 1):
        if record.get("type") != "single":
            continue
        for key in ("name", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(record.get(key), str):
                raise EvalError(f"{path}: line {i}: the field {key!r} is missing or not a string")
        out[record["name"]] = JudgeTemplate(record["name"], record["system_prompt"], record["prompt_template"],
                                            record["output_format"])
    return out


def template_name(category: str, turn: int) -> str:
    """FastChat's choice: ``single-math-v1`` (with a reference) for math/reasoning/coding; ``-multi-turn`` on turn 2."""
    if turn not in (1, 2):
        raise ValueError(f"turn: expected 1 or 2, got {turn}")
    base = "single-math-v1" if category in REFERENCE_CATEGORIES else "single-v1"
    return base + ("-multi-turn" if turn == 2 else "")


def judge_fields(turn: int, questions: Sequence[str], answers: Sequence[str],
                 references: Sequence[str] | None) -> dict[str, str]:
    """The values FastChat fills in (``run_judge_single``): turn 1 sees ``question``/``answer``, turn 2 both
    turns numbered; ``ref_answer_1``/``ref_answer_2`` are given whenever there is a reference."""
    fields = ({"question": questions[0], "answer": answers[0]} if turn == 1 else
              {"question_1": questions[0], "question_2": questions[1], "answer_1": answers[0],
               "answer_2": answers[1]})
    if references is not None:
        fields.update(ref_answer_1=references[0], ref_answer_2=references[1])
    return fields


def judge_messages(template: JudgeTemplate, fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """(system, user) messages for the judge. Every field the template names must be given (a reference
    template without a reference is an error, not a prompt with a hole); extra fields are ignored, as in
    FastChat. ``str.format`` does not re-read the values, so braces in an answer stay as they are."""
    missing = template.fields() - set(fields)
    if missing:
        raise EvalError(f"judge template {template.name}: no value for {', '.join(sorted(missing))}")
    return (("system", template.system_prompt), ("user", template.prompt_template.format(**fields)))


@dataclass(frozen=True)
class Rating:
    """A parsed judgment: ``value`` 1..10, or None with ``failure`` saying why (no rating, ambiguous, out of range)."""

    value: float | None
    failure: str | None = None
    written: str | None = None   # "[[n]]" or "[n]": the form the rating was found in


def parse_rating(reply: str | None) -> Rating:
    """The judge's ``[[n]]`` rating (see the module docstring for what counts as a failure)."""
    text = reply or ""
    found, written = RATING_RE.findall(text), "[[n]]"
    if not found:
        found, written = BACKUP_RE.findall(text), "[n]"
    if not found:
        return Rating(None, "no rating")
    values = sorted({float(v) for v in found})
    if len(values) > 1:
        return Rating(None, "ambiguous: " + ", ".join(f"{v:g}" for v in values))
    value = values[0]
    if not MIN_RATING <= value <= MAX_RATING:
        return Rating(None, f"out of range: {value:g}")
    return Rating(value, None, written)
