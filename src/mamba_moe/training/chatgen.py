"""Small local chat datasets for the tiny stage twins, the stage walkthrough and tests (no download).

Three generators, each deterministic in ``seed``, each writing JSONL records ``{"messages": [...]}`` (the
chat-source format ``data.source: chat`` reads):

- ``explain`` (stage 2, instruction): "Explain the Python module X" -> the first paragraph of X's
  docstring, read from the standard library's source files (``ast``, nothing imported).
- ``reasoning`` (stage 3): two-number additions, subtractions and multiplications answered step by step
  (column addition with carries, partial products), ending with the result.
- ``recall`` (stage 4, memory): multi-turn chats. The first user turn states facts (a name, a colour, a
  number, a city); one to four unrelated turns follow (arithmetic questions with their answers); the last
  user turn asks for one of the facts. The final answer is only right if the model carries the first turn
  across the distractors: a small test of the long-context memory the Mamba state must hold.

Run ``python -m mamba_moe.training.chatgen {explain,reasoning,recall} OUT.jsonl [--n N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..data.sources import stdlib_files

Chat = dict[str, list[dict[str, str]]]

_EXPLAIN_PROMPTS = ("Explain the Python module {m}.", "What is the {m} module for?",
                    "Describe the standard library module {m} in a few words.", "What does `{m}` do?")


def _chat(*turns: tuple[str, str]) -> Chat:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def explain_chats(n: int, seed: int = 0, max_chars: int = 400) -> list[Chat]:
    """Up to ``n`` chats "explain module X" -> the first paragraph of its docstring (stdlib files in a seeded
    order, read until ``n`` are found; the prompt wording is seeded too)."""
    files = stdlib_files()
    root = Path(os.path.commonpath([str(p) for p in files]))
    rng = random.Random(seed)
    rng.shuffle(files)
    found = []
    for path in files:
        if len(found) >= n:
            break
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if not doc:
            continue
        para = " ".join(doc.strip().split("\n\n")[0].split())
        if len(para) < 20:
            continue
        name = _module_name(path, root)
        if name and not name.startswith("_"):
            found.append((name, para[:max_chars]))
    return [_chat(("user", rng.choice(_EXPLAIN_PROMPTS).format(m=name)), ("assistant", text)) for name, text in found]


def _add_steps(a: int, b: int) -> str:
    steps, carry, digits = [], 0, []
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}, write {total % 10}"
                     + (f" carry {total // 10}" if total >= 10 else ""))
        digits.append(str(total % 10))
        carry = total // 10
    if carry:
        digits.append(str(carry))
    return "; ".join(steps) + f". So {a} + {b} = {''.join(reversed(digits))}."


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, worked answer, short answer) of one generated problem."""
    op = rng.choice("+-*")
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if op == "+":
        return f"What is {a} + {b}?", _add_steps(a, b), str(a + b)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return (f"What is {a} - {b}?", f"{a} - {b}: take {b // 10 * 10} from {a} to get {a - b // 10 * 10}, then "
                f"take {b % 10} to get {a - b}. So {a} - {b} = {a - b}.", str(a - b))
    b = rng.randint(2, 9)
    tens, ones = a // 10 * 10, a % 10
    return (f"What is {a} * {b}?", f"{tens} * {b} = {tens * b} and {ones} * {b} = {ones * b}; "
            f"{tens * b} + {ones * b} = {a * b}. So {a} * {b} = {a * b}.", str(a * b))


def reasoning_chats(n: int, seed: int = 0) -> list[Chat]:
    """``n`` arithmetic questions with step-by-step answers."""
    rng = random.Random(seed)
    return [_chat(("user", q), ("assistant", worked)) for q, worked, _ in (_arithmetic(rng) for _ in range(n))]


_NAMES = ("Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Ken", "Margaret", "Dennis", "Frances")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "silver", "teal")
_CITIES = ("Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth", "Riga", "Dakar", "Hanoi", "Bern")
_FACTS = {"colour": ("What is my favourite colour?", "Your favourite colour is {}."),
          "number": ("What is my lucky number?", "Your lucky number is {}."),
          "city": ("Which city do I live in?", "You live in {}."),
          "name": ("What is my name?", "Your name is {}.")}


def recall_chats(n: int, seed: int = 0, max_distractors: int = 4) -> list[Chat]:
    """``n`` multi-turn chats whose last answer repeats a fact from the first turn (see the module doc)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts = {"name": rng.choice(_NAMES), "colour": rng.choice(_COLOURS), "number": str(rng.randint(1, 99)),
                 "city": rng.choice(_CITIES)}
        turns: list[tuple[str, str]] = [
            ("user", f"Hi, I am {facts['name']}. My favourite colour is {facts['colour']}, my lucky number is "
                     f"{facts['number']} and I live in {facts['city']}. Please remember that."),
            ("assistant", f"Nice to meet you, {facts['name']}. I will remember.")]
        for _ in range(rng.randint(1, max_distractors)):
            q, _, short = _arithmetic(rng)
            turns += [("user", q), ("assistant", short)]
        key = rng.choice(sorted(_FACTS))
        question, answer = _FACTS[key]
        turns += [("user", question), ("assistant", answer.format(facts[key]))]
        out.append(_chat(*turns))
    return out


GENERATORS = {"explain": explain_chats, "reasoning": reasoning_chats, "recall": recall_chats}


def write_chats(records: list[Chat], path: str | os.PathLike) -> Path:
    """Write JSONL atomically and durably (``atomic_write``)."""
    path = Path(path)
    atomic_write(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mamba_moe.training.chatgen", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(GENERATORS))
    p.add_argument("out", help="output JSONL file")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    records: list[Any] = GENERATORS[args.kind](args.n, seed=args.seed)
    write_chats(records, args.out)
    print(f"{len(records)} {args.kind} chats -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
