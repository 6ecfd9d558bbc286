"""MT-Bench-local: MT-Bench's 80 two-turn questions (Zheng et al. 2023), answered by the model and graded
1–10 by a judge of your choice.

Published MT-Bench scores use GPT-4 as the judge; a score from any other judge is not comparable with
them, so this task is always reported as "MT-Bench-local (judge: NAME)" and never as MT-Bench.

- **Data**: ``question.jsonl``, ``judge_prompts.jsonl`` and ``reference_answer_gpt-4.jsonl`` of FastChat's
  ``llm_judge/data/mt_bench`` (``--set mt-bench-local.data=DIR``; default ``mt_bench/`` in the data folder).
- **Answers**: always in chat form (the backend's chat template). Turn 1 is the first question alone; turn 2
  is the conversation so far (question 1, the model's answer, question 2). Greedy by default (FastChat
  samples the creative categories; ``temperatures=fastchat`` does that, with a seed per question and turn).
- **Judging**: ``judge=MODEL`` (any MODEL form: checkpoint, HF dir, .gguf, openai:URL; ``self`` = the model
  under evaluation), greedy, with FastChat's single-answer prompts and reference answers
  (``mt_bench_judge``). Answers are cached apart from the judge, so judging again with another judge
  reuses them.
- **Score**: the mean rating over every judged turn that has a valid rating (FastChat drops its -1s the
  same way), with per-turn and per-category means; parse failures are counted by reason. Intervals: the
  bootstrap over questions (a question's two turns are not independent).

The runner asks in rounds (``Task.followups``): turn-1 answers; then turn-2 answers and turn-1 judgments;
then turn-2 judgments.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..backends.base import Backend, GenRequest
from ..data import data_file, read_jsonl
from ..errors import EvalError
from ..stats import bootstrap_interval, mean
from .base import Item, Option, Task, int_list, positive_int
from .mt_bench_judge import (
    REFERENCE_CATEGORIES,
    JudgeTemplate,
    judge_fields,
    judge_messages,
    load_judge_templates,
    parse_rating,
    template_name,
)

FILES = ("question.jsonl", "judge_prompts.jsonl", "reference_answer_gpt-4.jsonl")
JUDGE = "judge"
JUDGE_OPTIONS = ("judge", "judge_name", "judge_max_tokens")
# FastChat's temperature_config (fastchat/llm_judge/common.py), used with temperatures=fastchat
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


def temperature_mode(text: str) -> str:
    if text not in ("greedy", "fastchat"):
        raise ValueError(f"expected greedy or fastchat, got {text!r}")
    return text


def judge_display_name(backend: Backend) -> str:
    """A short name for the report: the model id of an endpoint, else the file's stem or the folder's name."""
    info = backend.info
    if info.kind == "openai":
        return str(info.details.get("model") or info.model)
    path = Path(info.model.split(" (")[0])
    return path.stem if info.kind == "gguf" else path.name


def load_questions(path: Path) -> list[dict[str, Any]]:
    questions = list(read_jsonl(path))
    for i, q in enumerate(questions, 1):
        turns = q.get("turns")
        if not isinstance(q.get("question_id"), int) or not isinstance(q.get("category"), str) or not (
                isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)):
            raise EvalError(f"{path}: line {i}: expected an integer question_id, a string category and two "
                            "string turns")
    return questions


def load_references(path: Path) -> dict[int, list[str]]:
    """GPT-4's two answers by question id (FastChat reads ``choices[0].turns``)."""
    out = {}
    for i, record in enumerate(read_jsonl(path), 1):
        try:
            turns = record["choices"][0]["turns"]
            qid = record["question_id"]
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"{path}: line {i}: expected question_id and choices[0].turns") from None
        if not (isinstance(qid, int) and isinstance(turns, list) and len(turns) == 2
                and all(isinstance(t, str) for t in turns)):
            raise EvalError(f"{path}: line {i}: expected an integer question_id and two string turns")
        out[qid] = turns
    return out


class MTBenchLocal(Task):
    name = "mt-bench-local"
    metric = "mean_rating"
    OPTIONS = {
        "judge": Option(str, None, "the judge: a MODEL (checkpoint dir, HF dir, .gguf file, openai:URL) or self"),
        "judge_name": Option(str, None, "the judge's name in the report (default: from its model)"),
        "data": Option(str, None, "folder with question.jsonl, judge_prompts.jsonl, reference_answer_gpt-4.jsonl "
                                  "(default: mt_bench/ in the data folder)"),
        "max_tokens": Option(positive_int, 1024, "tokens per answer (FastChat: 1024)"),
        "judge_max_tokens": Option(positive_int, 2048, "tokens per judgment (FastChat: 2048)"),
        "temperatures": Option(temperature_mode, "greedy", "greedy, or fastchat (its per-category temperatures)"),
        "question_ids": Option(int_list, None, "only these questions (default: all 80)"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.options["judge"]:
            raise EvalError("mt-bench-local needs a judge: --set mt-bench-local.judge=MODEL (a checkpoint or HF "
                            "directory, a .gguf file, openai:URL, or self for the model under evaluation)")
        self.helper_backends: dict[str, Backend] = {}

    # ---- data ------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self.options["data"]:
            path = Path(self.options["data"]) / name
            if not path.is_file():
                raise EvalError(f"--set mt-bench-local.data={self.options['data']}: {path} is missing (the folder "
                                f"needs {', '.join(FILES)} from FastChat's llm_judge/data/mt_bench)")
            return path
        return data_file(f"mt_bench/{name}", self.data_dir)

    def _load(self) -> None:
        questions = load_questions(self._path("question.jsonl"))
        wanted = self.options["question_ids"]
        if wanted is not None:
            known = {q["question_id"] for q in questions}
            unknown = sorted(set(wanted) - known)
            if unknown:
                raise EvalError(f"--set mt-bench-local.question_ids: no question {unknown} in question.jsonl")
            questions = [q for q in questions if q["question_id"] in set(wanted)]
        self.questions = questions
        self.templates = load_judge_templates(self._path("judge_prompts.jsonl"))
        for turn in (1, 2):
            for category in ("writing", "math"):
                if template_name(category, turn) not in self.templates:
                    raise EvalError(f"{self._path('judge_prompts.jsonl')}: no {template_name(category, turn)} "
                                    "template")
        self.references = load_references(self._path("reference_answer_gpt-4.jsonl"))

    # ---- settings --------------------------------------------------------------------------------
    def judge_name(self) -> str:
        if self.options["judge_name"]:
            return self.options["judge_name"]
        judge = self.helper_backends.get(JUDGE)
        return judge_display_name(judge) if judge is not None else str(self.options["judge"])

    def cache_settings(self) -> dict[str, Any]:
        # what an answer depends on: the judge's identity is in its own items' keys (the runner adds it) and
        # its token limit in their requests, so a new judge reuses the answers
        settings = {k: v for k, v in super().settings().items() if k not in JUDGE_OPTIONS}
        settings["mode"] = "chat"
        return settings

    def settings(self) -> dict[str, Any]:
        references = ", ".join(sorted(REFERENCE_CATEGORIES))
        settings = {**self.cache_settings(), "judge": self.options["judge"], "judge_name": self.judge_name(),
                    "judge_max_tokens": self.options["judge_max_tokens"], "judge_decoding": "greedy",
                    "judge_prompts": f"FastChat single-v1 / single-math-v1 (reference answers for {references})"}
        judge = self.helper_backends.get(JUDGE)
        if judge is not None:
            settings["judge_model"] = {"kind": judge.info.kind, "name": judge.info.model}
        return settings

    def helpers(self) -> dict[str, str]:
        return {JUDGE: self.options["judge"]}

    # ---- rounds ----------------------------------------------------------------------------------
    def _answer_request(self, question: dict[str, Any], turn: int,
                        messages: tuple[tuple[str, str], ...]) -> GenRequest:
        temperature, seed = 0.0, None
        if self.options["temperatures"] == "fastchat":
            temperature = FASTCHAT_TEMPERATURES.get(question["category"], 0.7)
            if temperature > 0:
                seed = (self.seed * 1_000_003 + question["question_id"] * 10 + turn) % 2**31
        return GenRequest(messages=messages, max_tokens=self.options["max_tokens"], temperature=temperature,
                          seed=seed)

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        self._load()
        out = []
        for q in self.questions[:limit]:
            request = self._answer_request(q, 1, (("user", q["turns"][0]),))
            out.append(Item(f"{self.name}/{q['question_id']}/answer/1", request, None, self._meta(q, 1, "answer")))
        return out

    def _meta(self, question: dict[str, Any], turn: int, stage: str, **extra: Any) -> dict[str, Any]:
        return {"question_id": question["question_id"], "category": question["category"], "turn": turn,
                "stage": stage, "_question": question, **extra}

    def _judge_item(self, question: dict[str, Any], turn: int, answers: list[str]) -> Item:
        template: JudgeTemplate = self.templates[template_name(question["category"], turn)]
        references = None
        if question["category"] in REFERENCE_CATEGORIES:
            references = self.references.get(question["question_id"])
            if references is None:
                raise EvalError(f"reference_answer_gpt-4.jsonl: no reference answer for question "
                                f"{question['question_id']} ({question['category']})")
        messages = judge_messages(template, judge_fields(turn, question["turns"], answers, references))
        request = GenRequest(messages=messages, max_tokens=self.options["judge_max_tokens"])
        return Item(f"{self.name}/{question['question_id']}/judge/{turn}", request, None,
                    self._meta(question, turn, "judge", template=template.name), backend=JUDGE)

    def followups(self, finished: Sequence[tuple[Item, dict[str, Any]]]) -> list[Item]:
        out = []
        for item, record in finished:
            if item.meta["stage"] != "answer":
                continue
            question, turn = item.meta["_question"], item.meta["turn"]
            answer = (record.get("output") or "").strip()   # FastChat strips answers before reusing them
            if turn == 1:
                messages = (("user", question["turns"][0]), ("assistant", answer), ("user", question["turns"][1]))
                out.append(Item(f"{self.name}/{question['question_id']}/answer/2",
                                self._answer_request(question, 2, messages), None,
                                self._meta(question, 2, "answer", _answer_1=answer)))
                out.append(self._judge_item(question, 1, [answer]))
            else:
                out.append(self._judge_item(question, 2, [item.meta["_answer_1"], answer]))
        return out

    # ---- scoring ---------------------------------------------------------------------------------
    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        verdicts = []
        for item, output in zip(items, outputs, strict=True):
            if item.meta["stage"] == "answer":
                verdict: dict[str, Any] = {"score": None, "stage": "answer"}
                if output.error:
                    verdict["error"] = output.error
            elif output.error:
                verdict = {"score": None, "stage": "judge", "rating": None, "failure": f"judge error: {output.error}"}
            else:
                rating = parse_rating(output.text)
                verdict = {"score": rating.value, "stage": "judge", "rating": rating.value,
                           "failure": rating.failure, "written": rating.written}
            verdicts.append(verdict)
        return verdicts

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        judged = [r for r in records if r["meta"]["stage"] == "judge"]
        answers = [r for r in records if r["meta"]["stage"] == "answer"]

        def pooled(groups: Sequence[list[float]]) -> float:
            return mean([v for g in groups for v in g])

        def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
            groups: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                groups.setdefault(r["meta"]["question_id"], [])
                if r["verdict"]["rating"] is not None:
                    groups[r["meta"]["question_id"]].append(r["verdict"]["rating"])
            units = [g for g in groups.values() if g]
            n = sum(len(g) for g in units)
            return {"value": pooled(units) if n else None, "ci95": list(bootstrap_interval(units, pooled)),
                    "n": n, "questions": len(groups)}

        failures = Counter(r["verdict"]["failure"] for r in judged if r["verdict"]["failure"])
        result = summary(judged)
        result.update(
            title=f"MT-Bench-local (judge: {self.judge_name()})", judge=self.judge_name(),
            judgments=len(judged), parse_failures=sum(failures.values()), failure_reasons=dict(failures),
            answer_errors=sum(1 for r in answers if r["verdict"].get("error")),
            by_turn={str(t): summary([r for r in judged if r["meta"]["turn"] == t]) for t in (1, 2)},
            by_category={c: summary([r for r in judged if r["meta"]["category"] == c])
                         for c in dict.fromkeys(r["meta"]["category"] for r in judged)})
        return result
