"""GSM8K (Cobbe et al. 2021): the 1,319 grade-school maths test problems, scored by exact match.

- **Base models**: ``num_fewshot`` (8) chain-of-thought exemplars drawn once from ``train.jsonl`` with the
  run's seed (the same exemplars for every question), in the dataset's own format::

      Question: <question>
      Answer: <worked solution, calculator annotations <<...>> removed>
      #### <number>

  then ``Question: <test question>\\nAnswer:``; generation stops at the next ``Question:``.
- **Chat models** (``--chat``): zero-shot, the question as one user message asking for the final answer
  on a ``#### <number>`` line.

Greedy decoding. Scoring is ``gsm8k_answer`` (extraction and normalisation, unit-tested on its own).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..backends.base import Backend, GenRequest
from ..data import data_file, read_jsonl
from ..stats import wilson_interval
from .base import Item, Option, Task, positive_int
from .gsm8k_answer import extract_answer, reference_answer

CALCULATOR_RE = re.compile(r"<<[^>]*>>")
CHAT_INSTRUCTION = ("Solve this problem step by step. End your reply with the final answer on its own line, "
                    "written as '#### <number>'.")
STOPS = ("Question:", "\n\n\n")


def clean_solution(answer: str) -> str:
    """A reference solution as an exemplar: calculator annotations removed, ``#### n`` kept."""
    return CALCULATOR_RE.sub("", answer).strip()


def fewshot_block(exemplars: Sequence[dict[str, str]]) -> str:
    return "".join(f"Question: {ex['question']}\nAnswer: {clean_solution(ex['answer'])}\n\n" for ex in exemplars)


class GSM8K(Task):
    name = "gsm8k"
    metric = "exact_match"
    OPTIONS = {
        "num_fewshot": Option(int, 8, "exemplars in base mode (0 = zero-shot)"),
        "max_tokens": Option(positive_int, 256, "tokens generated per answer (chat mode: twice this)"),
    }

    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        test_path = data_file("gsm8k/test.jsonl", self.data_dir)
        test = list(read_jsonl(test_path))
        for i, rec in enumerate(test):
            if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
                raise ValueError(f"{test_path}:{i + 1}: expected string fields 'question' and 'answer'")
        train = []
        if not self.chat and self.options["num_fewshot"] > 0:
            train = list(read_jsonl(data_file("gsm8k/train.jsonl", self.data_dir)))
        return test, train

    def exemplar_indices(self, n_train: int) -> list[int]:
        """The train rows used as exemplars: fixed by the seed alone (``random.Random`` with a string seed is
        the same on every platform and Python version)."""
        k = self.options["num_fewshot"]
        if self.chat or k <= 0:
            return []
        return random.Random(f"gsm8k-fewshot-{self.seed}").sample(range(n_train), k)

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        test, train = self._load()
        self.exemplars = self.exemplar_indices(len(train))
        prefix = fewshot_block([train[i] for i in self.exemplars])
        out = []
        for i, rec in enumerate(test[:limit]):
            if self.chat:
                request = GenRequest(messages=(("user", f"{rec['question']}\n\n{CHAT_INSTRUCTION}"),),
                                     max_tokens=2 * self.options["max_tokens"])
            else:
                request = GenRequest(prompt=f"{prefix}Question: {rec['question']}\nAnswer:",
                                     max_tokens=self.options["max_tokens"], stop=STOPS)
            out.append(Item(f"gsm8k/test/{i}", request, reference_answer(rec["answer"])))
        return out

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.chat:
            settings.pop("num_fewshot")
            settings["max_tokens"] = 2 * settings["max_tokens"]
        else:
            settings["exemplars"] = getattr(self, "exemplars", None)
        settings.update(decoding="greedy", stop=[] if self.chat else list(STOPS))
        return settings

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        verdicts = []
        for item, output in zip(items, outputs, strict=True):
            if output.error:
                verdicts.append({"score": 0.0, "correct": False, "extracted": None, "method": "none",
                                 "error": output.error})
                continue
            value, method = extract_answer(output.text)
            correct = value is not None and value == item.target
            verdicts.append({"score": float(correct), "correct": correct, "extracted": value, "method": method})
        return verdicts

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(records)
        correct = sum(bool(r["verdict"]["correct"]) for r in records)
        strict = sum(bool(r["verdict"]["correct"]) and r["verdict"]["method"] == "####" for r in records)
        methods = Counter(r["verdict"]["method"] for r in records)
        errors = sum(1 for r in records if r["verdict"].get("error"))
        return {"value": correct / n if n else None, "ci95": list(wilson_interval(correct, n)), "n": n,
                "correct": correct, "strict_match": strict / n if n else None, "extraction": dict(methods),
                "errors": errors}
