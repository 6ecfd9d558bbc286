"""The tiers together for one user's chat: retrieval into the prompt, generation, extraction into the store.

Each user turn:

1. **Deletions first.** Deletions made elsewhere (the ``mamba-moe memory forget`` CLI, another process)
   are noticed: records this chat injected or wrote that no longer exist are purged from every tier held
   here (``_reconcile``). The store counts forgets (``store.deletions()``); while the count is unchanged
   only the records this chat learnt of since the last turn are checked, so a turn costs a few look-ups,
   not a listing of the user's memories.
2. **Extraction** (``memory/extract.py``, rules; microseconds to a millisecond) runs on the caller's thread,
   so a deletion the user asks for ("forget my address") is applied and purged *before* the reply, which
   then cannot repeat it. Other writes go to the background writer.
3. **Folding**: when the working transcript outgrows ``ConversationBudget.max_transcript_tokens`` (or the
   model's context), the oldest turns are folded into the conversation summary (``conversation.py``, also
   saved with ``store.put_summary``) and the working state is rebuilt from the summary and the recent turns.
4. **Retrieval**: the user's relevant long-term facts (``store.search``) and document chunks
   (``store.search_documents``) that this chat has not already been shown become a memory block, a system
   message just before the user's (the whole memory injection of a turn is at most ``max_block_tokens``).
5. **Generation** on the kept working state (``working.py``): only this turn's tokens are fed.
6. **Writes** (the extracted facts) run on the background writer, off the reply's critical path;
   ``barrier()`` waits for them (tests, ``forget``), ``close()`` flushes them.

A failing memory (a locked or broken DB) never costs the reply: the turn is answered without the failing
part, the error is logged and counted in ``MemoryWriter.failures`` / ``MemorySession.degraded``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..inference.core.prompt import PromptTooLongError
from ..inference.core.sampling import SamplingParams
from .conversation import ConversationBudget, ConversationMemory, fit_block, mentions
from .errors import MemoryStoreError
from .extract import Extractor, Operation, apply_operations
from .records import DocumentHit, MemoryHit, MemoryRecord
from .working import WorkingMemory, encode_messages

log = logging.getLogger(__name__)
FACTS_HEADER = "Memory (what this user told you before; use it when relevant):"
DOCUMENTS_HEADER = "From the user's documents (cite as [name #chunk]):"
DOCUMENT_CHARS = 600          # the most of one document chunk shown in a memory block
QUERY_CHARS = 4000            # retrieval reads the start of a long message: a question is short, a paste is not


# ---- the background writer ----------------------------------------------------------------------------
class MemoryWriter:
    """One thread that runs store writes in order, off the reply's path. A failed write is logged and
    counted (``failures``), never raised into the chat; ``call`` runs one job and waits for its result."""

    def __init__(self, name: str = "mamba-moe-memory-writer") -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self.failures = 0
        self.last_error: str | None = None
        self._closed = False
        self._closing = threading.Lock()   # no job can be queued behind the stop sentinel (it would never run)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("memory writer: closed")
            self._jobs.put((job, future))
        return future

    def call(self, job: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``job`` after the writes queued before it; its result (its exception is raised here)."""
        return self.submit(job).result(timeout)

    @property
    def pending(self) -> int:
        return self._jobs.unfinished_tasks

    def barrier(self) -> None:
        """Wait until every write submitted so far has run."""
        self._jobs.join()

    def close(self) -> None:
        """Flush the queued writes and stop the thread."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                job, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(job())
                except BaseException as err:  # noqa: BLE001 (a write must never kill the writer)
                    self.failures += 1
                    self.last_error = f"{type(err).__name__}: {err}"
                    log.warning("memory write failed: %s", self.last_error)
                    future.set_exception(err)
            finally:
                self._jobs.task_done()


# ---- the memory block ------------------------------------------------------------------------------------
def record_needles(records: Iterable[MemoryRecord]) -> list[str]:
    """What a deleted record could leave behind in a transcript or summary: its text and its value."""
    return [n for r in records for n in (r.text, r.value) if n and n.strip()]


def cite(hit: DocumentHit) -> str:
    text = " ".join(hit.text.split())
    if len(text) > DOCUMENT_CHARS:
        text = text[:DOCUMENT_CHARS - 1].rstrip() + "…"
    return f"[{hit.name} #{hit.chunk_index}] {text}"


def render_memory(entries: list[tuple[str, str]]) -> str:
    """The block's text: facts, then document chunks, each in rank order."""
    facts = [t for section, t in entries if section == "fact"]
    documents = [t for section, t in entries if section == "document"]
    parts: list[str] = []
    if facts:
        parts += [FACTS_HEADER, *(f"- {f}" for f in facts)]
    if documents:
        parts += [DOCUMENTS_HEADER, *(f"- {d}" for d in documents)]
    return "\n".join(parts)


def memory_block(hits: list[MemoryHit], documents: list[DocumentHit], count: Callable[[str], int],
                 max_tokens: int) -> tuple[str, list[MemoryRecord]]:
    """The retrieved facts and chunks as one system message's text within ``max_tokens`` (by ``count``), and
    the records it shows. Facts and chunks take turns by rank (fact 1, chunk 1, fact 2, ...), and the
    lowest-ranked go first when the budget is short, so neither kind can crowd the other out."""
    hits = sorted(hits, key=lambda h: h.rank)
    docs = sorted(documents, key=lambda d: d.rank)
    entries: list[tuple[str, str]] = []
    for i in range(max(len(hits), len(docs))):
        entries += [("fact", hits[i].record.text)] if i < len(hits) else []
        entries += [("document", cite(docs[i]))] if i < len(docs) else []
    text = fit_block(render_memory, entries, count, max_tokens)
    shown = [h.record for h in hits if f"- {h.record.text}\n" in text + "\n"]
    if text and hits and not shown and text.startswith(FACTS_HEADER):
        shown = [hits[0].record]             # the best fact alone did not fit whole: it is shown cut
    return text, shown


def system_tokens(engine: Any) -> Callable[[str], int]:
    """Tokens ``text`` costs as a system message (ChatML markers included), by the model's tokenizer."""
    return lambda text: len(encode_messages(engine, [{"role": "system", "content": text}], False))


def _reply_tokens(params: Any) -> int:
    return getattr(params, "max_tokens", None) or SamplingParams().max_tokens


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("chat-%Y%m%dT%H%M%S.%fZ")


# ---- one chat ---------------------------------------------------------------------------------------------
@dataclass
class MemoryOptions:
    """``k_facts`` / ``k_documents``: retrieved per turn; ``budget``: the conversation tier's bounds (its
    ``max_block_tokens`` bounds everything memory injects in one turn); ``max_snapshots``: working states held."""

    k_facts: int = 5
    k_documents: int = 3
    budget: ConversationBudget = field(default_factory=ConversationBudget)
    max_snapshots: int | None = 16

    def __post_init__(self) -> None:
        for name in ("k_facts", "k_documents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (got {value!r})")


class MemorySession:
    """One user's chat with all four tiers. Not thread-safe (one chat, one caller); the writer is shared.

    ``store``: an open ``MemoryStore`` (thread-safe). ``session``: the store's session name (default: a new
    one per chat); a chat given a name it used before resumes that session's summary.
    """

    def __init__(self, engine: Any, store: Any, user: str, *, system: str | None = None, session: str | None = None,
                 options: MemoryOptions | None = None, writer: MemoryWriter | None = None,
                 clock: Callable[[], str] | None = None) -> None:
        self.engine, self.store, self.user = engine, store, user
        self.system = system
        self.session = session or utc_stamp()
        self.options = options or MemoryOptions()
        self._own_writer = writer is None
        self.writer = writer or MemoryWriter()
        self.clock = clock or (lambda: datetime.now(UTC).isoformat())
        self.extractor = Extractor()
        self.count = system_tokens(engine)
        self.conversation = ConversationMemory(self.options.budget)
        self.working = WorkingMemory(engine, system, self.options.max_snapshots)
        self.known: dict[int, list[str]] = {}    # record id -> its needles: records this chat showed or wrote
        self._known_lock = threading.Lock()       # the writer adds to ``known`` while the chat reads it
        self._unchecked: set[int] = set()         # ids added to ``known`` since the last deletion check
        self._deletions_seen: int | None = None   # the store's deletion count when ``known`` was last checked
        self.degraded = 0                         # turns answered without (part of) their memory
        saved = store.summary(self.user, self.session)
        if saved is not None:
            self.conversation = ConversationMemory.from_text(saved[0], saved[1], self.options.budget)
            self.working.replace([], self._header())

    # ---- the header: the system prompt and the conversation summary ------------------------------------
    def _header(self) -> str | None:
        summary = self.conversation.block(self.count)
        parts = [p for p in (self.system, summary) if p]
        return "\n\n".join(parts) or None

    def _summary_tokens(self) -> int:
        summary = self.conversation.block(self.count)
        return self.count(summary) if summary else 0

    # ---- a turn -----------------------------------------------------------------------------------------
    def reply(self, text: str, params: Any = None, write: Callable[[str], Any] | None = None) -> Any:
        """Answer one user message with memory; returns the engine's ``Completion``. A message that cannot
        fit the context even alone is refused first (``PromptTooLongError``), before anything changes."""
        tokens = self._message_tokens(text, params)
        self._reconcile()
        ops = self.extractor.extract(text, now=self.clock())
        if any(op.op in ("forget", "forget_all") for op in ops):
            self._apply_now(ops)
            ops = []
        found = self._search(text)
        block = self._block(*found, self.options.budget.max_block_tokens)
        if self._fold_if_needed(tokens, params, block):  # the summary now shares the turn's memory budget
            block = self._block(*found, self.options.budget.max_block_tokens - self._summary_tokens())
        completion = self.working.reply(text, params, context=block or None, write=write)
        if ops:
            self.writer.submit(lambda: self._write(ops))
        return completion

    def _search(self, text: str) -> tuple[list[MemoryHit], list[DocumentHit]]:
        """The user's facts and document chunks relevant to ``text`` (none when the store fails)."""
        options = self.options
        query = text[:QUERY_CHARS]
        try:
            hits = self.store.search(self.user, query, k=options.k_facts) if options.k_facts else []
            docs = self.store.search_documents(self.user, query, k=options.k_documents) if options.k_documents else []
        except Exception as err:  # noqa: BLE001 (a broken memory must not cost the reply)
            self.degraded += 1
            log.warning("memory retrieval failed for user %r, answering without it: %s", self.user, err)
            return [], []
        return hits, docs

    def _block(self, hits: list[MemoryHit], docs: list[DocumentHit], max_tokens: int) -> str:
        """This turn's memory block: the found facts and chunks the working context does not hold yet."""
        if max_tokens <= 0 or not (hits or docs):
            return ""
        context = "\n".join([self.working.system or ""] + [turn.text for turn in self.working.turns])
        hits = [h for h in hits if h.record.text not in context]
        docs = [d for d in docs if cite(d) not in context]
        block, shown = memory_block(hits, docs, self.count, max_tokens)
        with self._known_lock:
            for record in shown:
                self.known[record.id] = record_needles([record])
                self._unchecked.add(record.id)
        return block

    def _write(self, ops: list[Operation]) -> list[MemoryRecord]:
        written = apply_operations(self.store, self.user, ops, session=self.session)
        # a fact said again is not written again, but this chat now holds it: know its record too, so a
        # deletion elsewhere purges the turn that repeated it
        current = [self.store.current(self.user, op.slot) for op in ops if op.op == "set" and op.slot]
        with self._known_lock:
            for record in [*written, *(r for r in current if r is not None)]:
                if record.id not in self.known:
                    self.known[record.id] = record_needles([record])
                    self._unchecked.add(record.id)
        return written

    def _apply_now(self, ops: list[Operation]) -> None:
        """A turn that deletes: run its operations (after the queued writes) and purge what they removed."""
        def job() -> list[MemoryRecord]:
            before = self.store.list(self.user, include_superseded=True)
            apply_operations(self.store, self.user, ops, session=self.session)
            after = {r.id for r in self.store.list(self.user, include_superseded=True)}
            return [r for r in before if r.id not in after]

        try:
            removed = self.writer.call(job)
        except Exception as err:  # noqa: BLE001
            # unlike a failed look-up, a failed deletion is not answered around: the reply could repeat
            # what the user asked to delete
            raise MemoryStoreError(f"memory: the deletion asked for failed ({type(err).__name__}: {err}); "
                                   "nothing was answered, try again") from err
        if any(op.op == "forget_all" for op in ops):   # "forget everything": the whole chat goes too
            self.conversation = ConversationMemory(self.options.budget)   # (the store dropped its summaries)
            self.working.replace([], self._header())
            with self._known_lock:
                self.known.clear()
                self._unchecked.clear()
            return
        self.purge(record_needles(removed), [r.id for r in removed])

    # ---- the conversation tier ------------------------------------------------------------------------
    def _message_tokens(self, text: str, params: Any) -> int:
        """Tokens of the message; ``PromptTooLongError`` when it and its reply cannot fit the context alone
        (a text far too long is refused by its length, untokenized: ``core/prompt.py``'s bound)."""
        limit = self.engine.max_context - _reply_tokens(params) - 16
        prompts = self.engine.prompts
        if prompts.max_chars_per_token and len(text) > max(limit, 0) * prompts.max_chars_per_token:
            raise PromptTooLongError("message", max(limit, 0), chars=len(text))
        tokens = len(prompts.content(text))
        if tokens > limit:
            raise PromptTooLongError("message", max(limit, 0), tokens=tokens)
        return tokens

    def _fold_if_needed(self, message_tokens: int, params: Any, block: str) -> bool:
        """Fold the oldest turns when the working transcript is over budget or the next turn (its message,
        its memory ``block`` and its reply) might not fit the context."""
        budget = self.options.budget
        turns = self.working.turns
        if not turns:
            return False
        need = message_tokens + (self.count(block) if block else 0) + _reply_tokens(params) + 16   # + markers
        over = self.working.seen_tokens > budget.max_transcript_tokens
        if not over and self.working.seen_tokens + need < self.engine.max_context:
            return False
        keep = budget.keep_recent_turns
        if self._transcript_tokens(turns[-keep:] if keep else []) + need >= self.engine.max_context:
            keep = 0                                  # the recent turns alone do not leave room: fold them all
        old, recent = (turns[:-keep], turns[-keep:]) if keep else (turns, [])
        if not old:
            return False
        self.conversation.fold([t.messages for t in old], self._facts_of)
        self.working.replace(recent, self._header())
        self._save_summary()
        return True

    def _transcript_tokens(self, turns: list[Any]) -> int:
        return sum(len(t.prompt) + len(t.reply) + len(t.closing) for t in turns)

    @staticmethod
    def _facts_of(message: str) -> list[tuple[str | None, str]]:
        """Facts of a folded user message, by the same rules as the store's (a fresh extractor: a correction
        in a folded message has nothing left to correct)."""
        try:
            ops = Extractor().extract(message)
        except ValueError:
            return []
        return [(op.slot, op.text) for op in ops if op.op == "set" and op.text]

    def _save_summary(self) -> None:
        if self.conversation.empty:
            return
        text, covers = self.conversation.to_text(), self.conversation.covers_turns
        self.writer.submit(lambda: self.store.put_summary(self.user, self.session, text, covers_turns=covers))

    # ---- privacy ----------------------------------------------------------------------------------------
    def forget(self, **scope: Any) -> int:
        """``store.forget(user, **scope)`` (ids=, query=, everything=, session=), then the removed records
        are purged from the summary and the working memory. Returns how many records were removed."""
        def job() -> tuple[int, list[MemoryRecord]]:
            before = self.store.list(self.user, include_superseded=True)
            n = self.store.forget(self.user, **scope)
            after = {r.id for r in self.store.list(self.user, include_superseded=True)}
            return n, [r for r in before if r.id not in after]

        n, removed = self.writer.call(job)
        self.purge(record_needles(removed), [r.id for r in removed])
        return n

    def _reconcile(self) -> None:
        """Purge records this chat knows of that were deleted behind its back (another process, the CLI).

        All known records are checked only when the store's deletion count moved since the last check; else
        only those learnt of since (one may have been deleted before that count was read, after ``known``
        was copied: the writer thread adds to it at any time)."""
        with self._known_lock:
            if not self.known:
                return
        fresh: set[int] = set()
        try:
            deletions = self.store.deletions()   # read before ``known`` is copied: a later forget moves it
            with self._known_lock:
                known, fresh = dict(self.known), self._unchecked
                self._unchecked = set()
            check = list(known) if deletions != self._deletions_seen else [i for i in fresh if i in known]
            alive = self.store.existing_ids(self.user, check) if check else set()
        except Exception as err:  # noqa: BLE001
            with self._known_lock:
                self._unchecked |= fresh         # checked at the next turn instead
            self.degraded += 1
            log.warning("memory check failed for user %r: %s", self.user, err)
            return
        self._deletions_seen = deletions
        gone = [i for i in check if i not in alive]
        if gone:
            self.purge([n for i in gone for n in known[i]], gone)

    def purge(self, needles: list[str], ids: Iterable[int] = ()) -> None:
        """Drop every trace of ``needles`` held here: summary facts and lines (saved again), working turns
        that mention them, and every working state (rebuilt from what is left when next needed)."""
        with self._known_lock:
            for i in ids:
                self.known.pop(i, None)
                self._unchecked.discard(i)
        if not needles:
            return
        self.conversation.forget(needles)
        self._save_summary()     # also when unchanged: the store drops a summary whose session lost records
        kept = [t for t in self.working.turns if not mentions(t.text, needles)]
        self.working.replace(kept, self._header())

    # ---- the chat's life -----------------------------------------------------------------------------------
    def rollback(self, n_turns: int = 1) -> None:
        self.working.rollback(n_turns)

    def clear(self) -> None:
        """Forget the working conversation (not the long-term memory, not the summary)."""
        self.working.replace([], self._header())

    def set_system(self, system: str | None) -> None:
        """A new system prompt: the working state is rebuilt under it (the turns are kept)."""
        self.system = system
        self.working.replace(self.working.turns, self._header())

    def barrier(self) -> None:
        """Wait for the writes queued so far (tests; before reading the store from elsewhere)."""
        self.writer.barrier()

    def close(self) -> None:
        """Flush the writes (and stop the writer if this session made it)."""
        if self._own_writer:
            self.writer.close()
        else:
            self.writer.barrier()
