"""The server's per-user memory (``mamba-moe serve --memory DB``): retrieval into the prompt, writes after.

The OpenAI API is stateless (the client sends the whole conversation), so the server keeps no working or
conversation tier of its own: a chat request whose standard ``user`` field names a user gets

- before generation (on the prompt thread): the last user message's operations extracted
  (``memory/extract.py``); a deletion ("forget where I live") applied at once, so the reply cannot show it;
  then that user's relevant facts and document chunks as a bounded system message just before the last
  user message (``memory/session.py``'s block, at most ``max_block_tokens`` tokens);
- after the reply completed: the other operations written by the background writer, off the reply's path.

A request without ``user``, and every ``/v1/completions`` request, gets no memory. A user's facts are only
ever read with that user's name, so they cannot reach another user's prompt. Memory failures degrade:
the request is answered without memory, the failure logged and counted (``/health``), and the response
carries ``x-mamba-moe-memory: degraded`` (``on`` / ``off`` otherwise) so a client can tell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ...memory.errors import MemoryInputError
from ...memory.extract import Extractor, Operation, apply_operations
from ...memory.session import QUERY_CHARS, MemoryOptions, MemoryWriter, memory_block, system_tokens
from ..chat import check_messages
from .openai_api import APIError

log = logging.getLogger(__name__)
HEADER = "x-mamba-moe-memory"


@dataclass
class MemoryTurn:
    """What memory did for one request: the messages to encode, the writes to run after the reply."""

    messages: Any
    user: str | None = None
    status: str = "off"                      # off | on | degraded
    facts: int = 0
    documents: int = 0
    writes: list[Operation] = field(default_factory=list)

    def header(self) -> dict[str, str]:
        detail = f"; facts={self.facts}; documents={self.documents}" if self.status == "on" else ""
        return {HEADER: self.status + detail}


class ServerMemory:
    """One store and one writer for all users of a server. Thread-safe (the store is; the writer is a queue)."""

    def __init__(self, store: Any, engine: Any, options: MemoryOptions | None = None) -> None:
        self.store = store
        self.options = options or MemoryOptions()
        self.count = system_tokens(engine)
        self.writer = MemoryWriter("mamba-moe-server-memory")
        self.degraded = 0

    def health(self) -> dict[str, Any]:
        return {"db": str(getattr(self.store, "path", "")), "pending_writes": self.writer.pending,
                "write_failures": self.writer.failures, "degraded": self.degraded}

    @staticmethod
    def user_of(body: dict) -> str | None:
        """The request's ``user``: None when absent; a string the store accepts, else a 400 naming it."""
        user = body.get("user")
        if user is None or user == "":
            return None
        if not isinstance(user, str):
            raise APIError(400, f"user: expected a string, got {type(user).__name__}", "user")
        return user

    def prepare(self, body: Any, max_messages: int) -> MemoryTurn:
        """On a prompt thread, before the request is parsed: the messages with this user's memory block."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return MemoryTurn(body.get("messages") if isinstance(body, dict) else None)
        messages = body["messages"]
        user = self.user_of(body)
        if user is None:
            return MemoryTurn(messages)
        try:
            clean = check_messages(messages, max_messages)
        except ValueError:
            return MemoryTurn(messages, user)     # parse_request names what is wrong with them
        last = max((i for i, m in enumerate(clean) if m["role"] == "user"), default=None)
        if last is None:
            return MemoryTurn(messages, user)
        turn = MemoryTurn(messages, user, "on")
        text, query = clean[last]["content"], clean[last]["content"][:QUERY_CHARS]
        try:
            ops = Extractor().extract(text)
            if any(op.op in ("forget", "forget_all") for op in ops):
                self.writer.call(lambda: apply_operations(self.store, user, ops, source="server"))
            else:
                turn.writes = ops
            hits = self.store.search(user, query, k=self.options.k_facts) if self.options.k_facts else []
            docs = self.store.search_documents(user, query, k=self.options.k_documents) \
                if self.options.k_documents else []
        except MemoryInputError as err:
            if str(err).startswith("user"):       # the name itself is refused (too long, ...): the client's error
                raise APIError(400, str(err), "user") from err
            self.degraded += 1
            log.warning("memory refused the request of user %r; answering without it: %s", user, err)
            return MemoryTurn(messages, user, "degraded")
        except Exception as err:  # noqa: BLE001 (a broken memory must not cost the reply)
            self.degraded += 1
            log.warning("memory failed for user %r; answering without it: %s", user, err)
            return MemoryTurn(messages, user, "degraded")
        block, shown = memory_block(hits, docs, self.count, self.options.budget.max_block_tokens)
        turn.facts, turn.documents = len(shown), sum(1 for d in docs if f"[{d.name} #{d.chunk_index}]" in block)
        if block and len(clean) < max_messages:
            turn.messages = clean[:last] + [{"role": "system", "content": block}] + clean[last:]
        return turn

    def after_reply(self, turn: MemoryTurn) -> None:
        """Queue the request's writes (the reply is already on its way)."""
        if turn.user is None or not turn.writes:
            return
        user, ops = turn.user, turn.writes
        self.writer.submit(lambda: apply_operations(self.store, user, ops, source="server"))

    def close(self) -> None:
        """Flush the queued writes, then close the store."""
        try:
            self.writer.close()
        finally:
            self.store.close()
