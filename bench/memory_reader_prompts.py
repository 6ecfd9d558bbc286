"""What the model reader is shown: the facts of its training rows against the facts of the evaluation's prompts.

    python bench/memory_reader_prompts.py                              # eval seeds 0 1; 300 training conversations
    python bench/memory_reader_prompts.py --eval-seeds 0 --train-conversations 1000 --train-sessions 50
    python bench/memory_reader_prompts.py --hard-negatives 0 0.25 0.5     # training rows at these shares

The evaluation (``evaluation/tasks/memory_recall.py``) replays each held-out conversation through the rule
extractor into a store and shows the reader what ``memory.reader.retrieve`` returns: the question's
current fact first, then the store's best search hits. The training rows (``data.memory_dialogues.
reader_rows``, what ``bench/memory_reader.py`` trains on) sample the other facts of the conversation at
random around the gold one. If the two differed in how often a prompt holds the same attribute of another
person (the GPU reader's most frequent miss: a relative's value for the asked one, docs/memory.md), the
training rows would not teach the binding the evaluation tests. Each fact a prompt shows beside the gold
one is counted as one of:

- ``same attribute, other person``: the asked attribute of someone else (the hard negative);
- ``same person, other attribute``; ``unrelated``: neither.

Runs on the CPU in seconds; no model is involved (the oracle reader's items carry the prompts' facts).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from collections import Counter
from dataclasses import dataclass

from _machine import cpu_name

from mamba_moe.data.memory_dialogues import DialogueConfig, generate, reader_rows
from mamba_moe.evaluation.tasks.memory_recall import MemoryRecall
from mamba_moe.memory.slots import ABSTAIN, fact_text, split_slot

KINDS = ("same attribute, other person", "same person, other attribute", "unrelated")


def kind_of(asked: str, shown: str) -> str | None:
    """How a shown fact's slot relates to the asked slot (None: it is the asked slot itself)."""
    if shown == asked:
        return None
    (asked_who, asked_attribute), (shown_who, shown_attribute) = split_slot(asked), split_slot(shown)
    if asked_attribute.key == shown_attribute.key:
        return KINDS[0]
    return KINDS[1] if asked_who == shown_who else KINDS[2]


@dataclass
class Prompt:
    asked: str            # the probe's slot
    shown: list[str]      # the slots of the facts in the prompt, in order
    answerable: bool      # the gold answer is a stored value, not "I don't know"


def evaluation_prompts(seed: int) -> list[Prompt]:
    class NoModel:   # the task asks a backend for its context and token counts only
        max_context = 0

        def count_tokens(self, text: str) -> None:
            return None

    task = MemoryRecall({"reader": "oracle"}, seed=seed)
    return [Prompt(item.meta["slot"], [slot for slot, _ in item.meta["prompt_facts"]], item.target != ABSTAIN)
            for item in task.items(NoModel(), None)]


def training_prompts(conversations: int, sessions: int, hard_negatives: float = 0.0) -> list[Prompt]:
    out = []
    for conversation in generate(0, conversations, split="train", config=DialogueConfig(sessions=sessions)):
        facts = {fact_text(p.slot, p.answer): p.slot for p in conversation.probes if p.answer != ABSTAIN}
        for row, probe in zip(reader_rows(conversation, hard_negatives=hard_negatives), conversation.probes,
                              strict=True):
            slot_of = facts | ({row["hard_negative"]["fact"]: row["hard_negative"]["slot"]}
                               if "hard_negative" in row else {})
            listing = row["messages"][0]["content"].splitlines()
            shown = [slot_of[line[2:]] for line in listing if line.startswith("- ") and line[2:] in slot_of]
            out.append(Prompt(probe.slot, shown, probe.answer != ABSTAIN))
    return out


def row(name: str, prompts: list[Prompt]) -> str:
    counts = Counter(k for p in prompts for k in (kind_of(p.asked, s) for s in p.shown) if k is not None)
    total = sum(counts.values())
    hard = sum(any(kind_of(p.asked, s) == KINDS[0] for s in p.shown) for p in prompts)
    answerable = [p for p in prompts if p.answerable and p.asked in p.shown]
    first = sum(p.shown.index(p.asked) == 0 for p in answerable)
    shares = " | ".join(f"{counts[k] / total:.3f}" for k in KINDS)
    return (f"| {name} | {len(prompts)} | {total / len(prompts):.2f} | {shares} | {hard / len(prompts):.3f} | "
            f"{first / len(answerable):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-conversations", type=int, default=300)
    parser.add_argument("--train-sessions", type=int, default=8, help="bench/memory_reader.py's --sessions")
    parser.add_argument("--hard-negatives", type=float, nargs="+", default=[0.0, 0.5],
                        help="shares of training rows given a hard negative (reader_rows), a table row each")
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## What the memory reader is shown ({now})\n")
    print(f"- device: {cpu_name()}; Python {platform.python_version()}\n")
    print("| prompts | n | other facts each | " + " | ".join(KINDS)
          + " | prompts with a same-attribute other-person fact | gold fact shown first |")
    print("|---" * 8 + "|")
    for seed in args.eval_seeds:
        print(row(f"evaluation seed {seed} (store + retrieve, 50 sessions)", evaluation_prompts(seed)))
    for share in args.hard_negatives:
        print(row(f"training rows ({args.train_conversations} conversations of {args.train_sessions} sessions, "
                  f"hard negatives {share:g})",
                  training_prompts(args.train_conversations, args.train_sessions, share)))


if __name__ == "__main__":
    main()
