"""Multi-session memory (issue 19): conversations replayed through the long-term store, then probed.

Each held-out conversation (``data/memory_dialogues.py``, evaluation seeds only: ``--seed s`` reads
seed ``EVAL_SEEDS.start + s``) is replayed message by message through the rule extractor into a fresh
``MemoryStore`` (a temporary SQLite file, one user per conversation), then every probe is answered:

- ``reader=oracle``: the store and retrieval alone (``memory/reader.py``'s oracle: the question's slot,
  ``store.current``); the model's answer is not used (the runner sends every item to the model, so its
  request is the bare question for one token, and that token is ignored);
- ``reader=model``: the retrieved facts in a system message, the question, the model's greedy answer;
- ``reader=choice``: the same prompt; the answer is the most likely of the shown facts' values and
  ``I don't know`` (each scored as the model's whole answer turn), so a miss is a wrong choice, never a
  garbled copy: beside ``model`` it splits the model's losses into choosing and copying.

Exact match after normalising case, spaces and closing punctuation; no judge. Reported: ``recall`` (the
metric: facts stated once), ``latest`` (facts changed since: the last value, or an abstention after a
retraction), ``stale_rate`` (latest probes answered with an earlier value), ``abstention`` (never-stated
facts answered "I don't know"), ``deleted`` and ``deleted_leaks`` (answers naming a value the user asked
to forget, plus rows of a forgotten slot the store still holds or returns by keyword search, or that reach
the model reader's prompt), ``gold_in_prompt`` (answerable probes whose gold value is among the facts the
model reader is shown: the ceiling retrieval sets for the model), ``failures`` (why each wrong answer is
wrong, per kind: :func:`failure`), and the conversations' length in the model's tokens next to its context,
so "longer than the context" is measured, not assumed. Intervals are bootstraps over conversations (the
probes of one are not independent).
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from ...data.chatml import render_chat_text
from ...data.memory_dialogues import EVAL_SEEDS, KINDS, Conversation, DialogueConfig, generate
from ...memory.extract import Extractor, apply_operations
from ...memory.reader import (
    answer_choices,
    answers_match,
    is_abstention,
    memory_messages,
    mentions,
    normalize_answer,
    oracle_answer,
    retrieve,
)
from ...memory.slots import ABSTAIN, split_slot
from ..backends.base import Backend, ChoiceRequest, GenRequest
from ..errors import EvalError
from ..stats import clustered_interval, wilson_interval
from .base import Item, Option, Task, positive_int

CHARS_PER_TOKEN = 4
READERS = ("oracle", "model", "choice")


def reader_kind(text: str) -> str:
    if text not in READERS:
        raise ValueError(f"expected one of {', '.join(READERS)}, got {text!r}")
    return text


def replay(store: Any, conversation: Conversation) -> dict[str, int]:
    """Every user message of ``conversation`` through a fresh extractor into ``store``; counts of what it did."""
    extractor, counts = Extractor(), defaultdict(int)
    for session, turn in conversation.user_turns():
        ops = extractor.extract(turn.content, now=turn.at)
        for op in ops:
            counts[op.op] += 1
        apply_operations(store, conversation.user, ops, session=f"session-{session.index}")
    counts.update({f"skipped_{k}": v for k, v in extractor.skipped.items()})
    return dict(counts)


def store_leaks(store: Any, conversation: Conversation, slot: str, values: Sequence[str]) -> int:
    """Records of a forgotten slot the store still holds: in its history, or found by searching each value."""
    found = {r.id for r in store.history(conversation.user, slot)}
    for value in values:
        hits = store.search(conversation.user, value, k=20, include_superseded=True, mode="bm25")
        found |= {h.record.id for h in hits if h.record.slot == slot}
    return len(found)


class MemoryRecall(Task):
    name = "memory"
    metric = "recall"
    OPTIONS = {
        "reader": Option(reader_kind, "oracle", "oracle (the store and retrieval alone), model (the model's "
                         "greedy answer) or choice (the model's most likely shown value or abstention)"),
        "conversations": Option(positive_int, 20, "held-out conversations (--limit cuts the probes)"),
        "sessions": Option(positive_int, 50, "sessions per conversation"),
        "k": Option(positive_int, 5, "facts retrieved into the model reader's prompt"),
        "max_tokens": Option(positive_int, 16, "tokens generated per answer (model reader)"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context: dict[str, Any] = {}

    def cannot_run_on(self, backend: Backend) -> str | None:
        if self.options["reader"] == "choice" and not backend.can_choose:
            return (f"memory.reader=choice: the {backend.info.kind} backend cannot score a chat's answers; use a "
                    "checkpoint, an HF model or a GGUF file, or memory.reader=model")
        return super().cannot_run_on(backend)

    def conversations(self) -> list[Conversation]:
        config = DialogueConfig(sessions=self.options["sessions"])
        return generate(EVAL_SEEDS.start + self.seed, self.options["conversations"], split="eval", config=config)

    def _tokens(self, backend: Backend, conversation: Conversation) -> tuple[int, bool]:
        text = render_chat_text(conversation.messages(with_probes=False))
        counted = backend.count_tokens(text)
        return (counted, False) if counted is not None else (-(-len(text) // CHARS_PER_TOKEN), True)

    def items(self, backend: Backend, limit: int | None) -> list[Item]:
        from ...memory.store import MemoryStore

        reader = self.options["reader"]
        if (reason := self.cannot_run_on(backend)) is not None:    # the runner skips first; a direct call fails
            raise EvalError(reason)
        out, lengths, estimated, extracted = [], [], False, defaultdict(int)
        conversations = self.conversations()
        with tempfile.TemporaryDirectory(prefix="mamba-moe-memory-eval-") as tmp, \
                MemoryStore(Path(tmp) / "memory.db") as store:
            for c, conversation in enumerate(conversations):
                n_tokens, estimated = self._tokens(backend, conversation)
                lengths.append(n_tokens)
                for key, value in replay(store, conversation).items():
                    extracted[key] += value
                for j, probe in enumerate(conversation.probes):
                    answer = oracle_answer(store, conversation.user, probe.question)
                    records = retrieve(store, conversation.user, probe.question, k=self.options["k"])
                    facts = [r.text for r in records]
                    messages = tuple((m["role"], m["content"]) for m in memory_messages(probe.question, facts))
                    leaked = (store_leaks(store, conversation, probe.slot, probe.forgotten)
                              if probe.kind == "deleted" else 0)
                    if reader == "oracle":   # the runner asks every item's model: one token of the question, ignored
                        request = GenRequest(messages=(("user", probe.question),), max_tokens=1)
                    elif reader == "choice":
                        request = ChoiceRequest(messages, tuple(answer_choices(records)))
                    else:
                        request = GenRequest(messages=messages, max_tokens=self.options["max_tokens"],
                                             stop=("\n",))   # the answer is its first line
                    out.append(Item(f"memory/{c}/{j}", request, probe.answer, {
                        "conversation": c, "kind": probe.kind, "slot": probe.slot, "oracle": answer.text,
                        "stale": list(probe.stale), "forgotten": list(probe.forgotten),
                        "distractors": list(probe.distractors), "store_leaks": leaked,
                        "prompt_facts": [[r.slot, r.value] for r in records],
                        "gold_in_prompt": probe.answer != ABSTAIN and any(mentions(f, probe.answer) for f in facts),
                        "prompt_leaks": sum(any(mentions(f, v) for f in facts) for v in probe.forgotten)}))
        max_context = backend.max_context
        self.context = {
            "conversation_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "min": min(lengths),
                                    "max": max(lengths)},
            "token_unit": f"estimated ({CHARS_PER_TOKEN} characters each)" if estimated else "model tokens",
            "max_context": max_context,
            "overflowing": (sum(n > max_context for n in lengths) / len(lengths)) if max_context else None,
            "extracted": dict(sorted(extracted.items())),
        }
        return out[:limit]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "prompt": "chat messages",
                "decoding": "most likely shown value or abstention" if self.options["reader"] == "choice" else "greedy",
                "eval_seed": EVAL_SEEDS.start + self.seed}

    def score(self, items: Sequence[Item], outputs: Sequence[Any]) -> list[dict[str, Any]]:
        verdicts = []
        for item, output in zip(items, outputs, strict=True):
            if self.options["reader"] == "oracle":
                answer, error = item.meta["oracle"], None
            elif self.options["reader"] == "choice":
                best = output.best
                answer, error = ("", output.error) if best is None else (item.request.choices[best], None)
            else:
                answer, error = ("", output.error) if output.error else (output.text, None)
            verdict = judge(answer, item.target, item.meta)
            if error:   # the backend refused the request (too long a prompt): not a reading failure
                verdict |= {"error": error, "failure": "error" if not verdict["correct"] else None}
            verdicts.append(verdict)
        return verdicts

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        by_kind: dict[str, dict[int, list[dict[str, Any]]]] = {k: defaultdict(list) for k in KINDS}
        for r in records:
            by_kind[r["meta"]["kind"]][r["meta"]["conversation"]].append(r)

        def rate(kind: str, flag: str) -> dict[str, Any]:
            units = [[bool(r["verdict"][flag]) for r in rs] for rs in by_kind[kind].values()]
            n = sum(map(len, units))
            if not n:
                return {"value": None, "ci95": [None, None], "n": 0}

            def share(us: Sequence[list[bool]]) -> float:
                return sum(map(sum, us)) / max(1, sum(map(len, us)))

            value = share(units)
            interval = (clustered_interval(units, share, value) if len(units) >= 2
                        else wilson_interval(sum(map(sum, units)), n))
            return {"value": value, "ci95": list(interval), "n": n}

        recall = rate("recall", "correct")
        deleted = [r for rs in by_kind["deleted"].values() for r in rs]
        answer_leaks = sum(bool(r["verdict"]["leak"]) for r in deleted)
        index_leaks = sum(int(r["meta"]["store_leaks"]) + int(r["meta"]["prompt_leaks"]) for r in deleted)
        answerable = [r for r in records if r["meta"]["kind"] in ("recall", "latest") and r["target"] != ABSTAIN]
        in_prompt = sum(bool(r["meta"]["gold_in_prompt"]) for r in answerable)
        failures = {kind: dict(sorted(Counter(r["verdict"].get("failure") for rs in by_kind[kind].values()
                                              for r in rs if r["verdict"].get("failure")).items()))
                    for kind in KINDS}
        return {**recall, "latest": rate("latest", "correct"), "stale_rate": rate("latest", "stale"),
                "abstention": rate("abstain", "correct"), "deleted": rate("deleted", "correct"),
                "deleted_leaks": answer_leaks + index_leaks, "deleted_leaks_in_answers": answer_leaks,
                "deleted_leaks_in_store": index_leaks, "failures": failures,
                "gold_in_prompt": {"value": in_prompt / len(answerable) if answerable else None,
                                   "n": len(answerable)},
                "accuracy": {"value": sum(bool(r["verdict"]["correct"]) for r in records) / max(1, len(records)),
                             "n": len(records)},
                "conversations": len({r["meta"]["conversation"] for r in records}), **self.context}


def judge(answer: str, gold: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One probe's verdict: right or wrong, whether the answer was stale or leaked a forgotten value, and why
    a wrong one is wrong (:func:`failure`)."""
    correct = answers_match(answer, gold)
    stale = not correct and any(mentions(answer, v) for v in meta["stale"])
    leak = any(mentions(answer, v) for v in meta["forgotten"])
    return {"score": float(correct), "correct": correct, "answer": answer, "abstained": is_abstention(answer),
            "stale": stale, "leak": leak, "failure": None if correct else failure(answer, gold, meta)}


FAILURES = ("abstained", "stale", "leaked", "other_person", "other_attribute", "garbled_copy", "not_in_prompt",
            "error")   # the last: the backend refused the request (score's, not failure's)
GARBLED_RATIO = 0.6


def failure(answer: str, gold: str, meta: dict[str, Any]) -> str:
    """Why a wrong answer is wrong, checked in this order (the first that holds):

    ``abstained`` (``I don't know`` where the gold is a value), ``stale`` (an earlier value of the slot),
    ``leaked`` (a value the user asked to forget), ``other_person`` / ``other_attribute`` (the value of
    another fact shown in the prompt: the same attribute of someone else, as "my sister's name" for "my
    name", or another attribute), ``garbled_copy`` (not in the prompt but resembling the gold: a shared word,
    or a character-level similarity of at least ``GARBLED_RATIO``: a copy that went wrong part-way), and
    ``not_in_prompt`` (anything else, including a value where the answer should have been an abstention)."""
    if is_abstention(answer):
        return "abstained"
    if any(mentions(answer, v) for v in meta["stale"]):
        return "stale"
    if any(mentions(answer, v) for v in meta["forgotten"]):
        return "leaked"
    attribute = split_slot(meta["slot"])[1].key
    for slot, value in meta.get("prompt_facts", ()):
        if value and slot and slot != meta["slot"] and answers_match(answer, value):
            return "other_person" if split_slot(slot)[1].key == attribute else "other_attribute"
    if not is_abstention(gold):
        said, want = normalize_answer(answer), normalize_answer(gold)
        if set(said.split()) & set(want.split()) or SequenceMatcher(None, said, want).ratio() >= GARBLED_RATIO:
            return "garbled_copy"
    return "not_in_prompt"
