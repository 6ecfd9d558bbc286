"""Working memory: one chat's decode state (Mamba2 state + attention KV) kept across its turns.

A turn feeds only its new tokens on top of the state the last turn left, so the history is never read
again; after each turn the state is kept as a snapshot, so a chat can ``rollback`` turns or ``branch``.
A hybrid cannot cut a prefix out of its state the way a transformer trims its KV cache (the Mamba state
summarises the whole past), so a snapshot per turn is what makes rolling back cheap.

The transcript is kept as the token stream the model actually saw, turn by turn::

    header  (the system prompt's ChatML, may be empty)
    turn i: prompt_i   (this turn's messages in ChatML + ``<|im_start|>assistant\\n``)
            reply_i    (the generated ids the model was fed: all but the last one sampled)
            closing_i  (what closes the reply: the last sampled id unless it was an end token, then
                        ``<|im_end|>\\n``; fed at the start of the next turn)

Snapshot i is the state after ``reply_i`` (``closing_i`` not yet fed). Its reference is a fresh forward
over the same stream (``tests/memory/test_working.py`` compares them). Note the reply is kept as the ids
generated, not re-tokenized from its text (BPE could split the text differently); generation reuses the
engine's batch and sampler through ``Engine.request(cache=..., keep_cache=True)``.

Snapshots are immutable: a turn continues from a clone, so branches share them safely. ``max_snapshots``
bounds how many are held (each holds the attention keys so far); a state that is no longer held is rebuilt
by feeding the kept tokens from the nearest older snapshot (or from the start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data.chat import encode_chat_prompt
from ..inference.chat import check_messages
from ..inference.core.request import Completion
from ..inference.core.sampling import SamplingParams
from ..model.cache import HybridCache

_PREFILL = SamplingParams(max_tokens=1, temperature=0.0)  # a "generation" of one token: only its state is kept


def encode_messages(engine: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Ids of ``messages`` in the project's ChatML (markers as ids, content as text: ``data/chat.py``), with
    the assistant's generation prompt if asked. Chat encoding is piecewise, so the ids of a chat are the
    ids of its messages one after another: what lets a turn be encoded alone."""
    prompts = engine.prompts
    return encode_chat_prompt(prompts.content, prompts.special, check_messages(messages), generation_prompt)


@dataclass(frozen=True)
class Turn:
    """One turn as text (``messages``: an optional system block, the user message, the reply) and as the
    ids the model saw (see the module doc)."""

    messages: tuple[dict[str, str], ...]
    prompt: tuple[int, ...]
    reply: tuple[int, ...]
    closing: tuple[int, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        """Every text of the turn, for checks such as "does this turn mention a deleted fact?"."""
        return "\n".join(m["content"] for m in self.messages)


@dataclass
class WorkingMemory:
    """One chat's kept state over an ``Engine`` (with a tokenizer). Not thread-safe: one chat, one caller.

    ``system``: the chat's system prompt (fed once, first). ``max_snapshots``: states held at most (the
    newest; None = all).
    """

    engine: Any
    system: str | None = None
    max_snapshots: int | None = 16
    turns: list[Turn] = field(default_factory=list)
    _snapshots: dict[int, HybridCache] = field(default_factory=dict, repr=False)  # turn count -> state

    def __post_init__(self) -> None:
        if self.max_snapshots is not None and self.max_snapshots < 1:
            raise ValueError(f"max_snapshots: must be a positive integer or None (got {self.max_snapshots!r})")
        prompts = self.engine.prompts
        self._im_end = prompts.special.im_end
        self._newline = prompts.content("\n")
        self.header = tuple(self._encode([{"role": "system", "content": self.system}], False) if self.system
                            else ())

    # ---- encoding --------------------------------------------------------------------------------
    def _encode(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        return encode_messages(self.engine, messages, generation_prompt)

    def messages(self) -> list[dict[str, str]]:
        """The chat as text: the system prompt and every turn's messages."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for turn in self.turns for m in turn.messages]

    def transcript_ids(self, turns: int | None = None) -> list[int]:
        """The token stream of the first ``turns`` turns (all by default), each reply closed."""
        ids = list(self.header)
        for turn in self.turns[:turns]:
            ids += [*turn.prompt, *turn.reply, *turn.closing]
        return ids

    @property
    def seen_tokens(self) -> int:
        """Tokens the kept state has seen: the transcript less the last reply's closing."""
        return len(self.transcript_ids()) - (len(self.turns[-1].closing) if self.turns else 0)

    # ---- states ----------------------------------------------------------------------------------
    def _between(self, start: int, end: int) -> list[int]:
        """Ids that take the state after turn ``start`` (0 = nothing fed) to the state after turn ``end``."""
        ids = list(self.header) if start == 0 else list(self.turns[start - 1].closing)
        for i in range(start, end):
            turn = self.turns[i]
            ids += [*turn.prompt, *turn.reply] + (list(turn.closing) if i < end - 1 else [])
        return ids

    def _run(self, ids: list[int], params: SamplingParams, cache: HybridCache | None,
             write: Callable[[str], Any] | None = None) -> tuple[Completion, HybridCache]:
        """Feed ``ids`` on ``cache`` (consumed) and generate through the engine; the completion and the
        state after everything fed."""
        request = self.engine.request(ids, params, cache=cache, keep_cache=True)
        for event in self.engine.run([request]):
            if write is not None and event.text:
                write(event.text)
        return request.completion(), request.final_cache

    def state(self) -> HybridCache | None:
        """A fresh copy of the state after the last turn (None before the first), rebuilt if not held."""
        n = len(self.turns)
        if n == 0:
            return None
        if n not in self._snapshots:
            older = max((k for k in self._snapshots if k < n), default=0)
            start = self._snapshots[older].clone() if older else None
            _, cache = self._run(self._between(older, n), _PREFILL, start)
            self._keep(n, cache)
        return self._snapshots[n].clone()

    def _keep(self, n: int, cache: HybridCache) -> None:
        self._snapshots[n] = cache
        if self.max_snapshots is not None:
            for k in sorted(self._snapshots)[:-self.max_snapshots]:
                del self._snapshots[k]

    @property
    def snapshots(self) -> list[int]:
        """Turn counts whose state is held (0 is the empty state, never held)."""
        return sorted(self._snapshots)

    # ---- the chat --------------------------------------------------------------------------------
    def reply(self, user: str, params: SamplingParams | None = None, *, context: str | None = None,
              write: Callable[[str], Any] | None = None) -> Completion:
        """Answer ``user`` (streamed through ``write``), feeding only this turn's tokens on the kept state.

        ``context``: a system message put just before the user's (the memory block of this turn). The turn
        is recorded only if generation completes; an error or Ctrl-C leaves the chat as it was.
        """
        messages = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": user}]
        prompt = self._encode(messages, True)
        lead = self._between(len(self.turns), len(self.turns))   # the header, or the last reply's closing
        completion, cache = self._run(lead + prompt, params or SamplingParams(), self.state(), write)
        out = completion.token_ids
        ended = bool(out) and out[-1] in self.engine.end_ids | frozenset((params or SamplingParams()).stop_token_ids)
        closing = ([] if ended or not out else [out[-1]]) + [self._im_end, *self._newline]
        turn = Turn(tuple({**m} for m in messages) + ({"role": "assistant", "content": completion.text},),
                    tuple(prompt), tuple(out[:-1]), tuple(closing), completion.finish_reason)
        self.turns.append(turn)
        self._keep(len(self.turns), cache)
        return completion

    def rollback(self, n_turns: int = 1) -> None:
        """Forget the last ``n_turns`` turns; the next turn continues from the state before them."""
        if isinstance(n_turns, bool) or not isinstance(n_turns, int) or not 0 <= n_turns <= len(self.turns):
            raise ValueError(f"n_turns: expected an integer in [0, {len(self.turns)}] (the turns so far), "
                             f"got {n_turns!r}")
        keep = len(self.turns) - n_turns
        del self.turns[keep:]
        for k in [k for k in self._snapshots if k > keep]:
            del self._snapshots[k]

    def branch(self) -> WorkingMemory:
        """An independent chat with the same past: turns and snapshots are shared (both are immutable)."""
        return WorkingMemory(self.engine, self.system, self.max_snapshots, list(self.turns), dict(self._snapshots))

    def replace(self, turns: list[Turn], system: str | None = None) -> None:
        """Start over from ``turns`` under ``system`` (a new summary block, turns dropped for privacy):
        every held state is dropped, so none keeps text that is gone; the state is rebuilt when next needed."""
        self.system = system
        self.header = tuple(self._encode([{"role": "system", "content": system}], False) if system else ())
        self.turns = list(turns)
        self._snapshots = {}
