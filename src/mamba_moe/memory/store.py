"""The long-term and external memory: one SQLite file holding every user's facts, summaries and documents.

Design (docs/memory.md, "Long-term store"):

- stdlib ``sqlite3`` in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction (the write lock is
  taken up front, so two processes queue on ``busy_timeout`` instead of failing on a lock upgrade), and
  ``synchronous=FULL``: a write that returned is on disk. A SIGKILL at any point leaves the last committed
  state and consistent FTS indexes, because rows and index entries commit together.
- Every query filters on ``user``; no method returns another user's rows.
- Bi-temporal facts: a record with a ``slot`` supersedes the user's current record of that slot (same
  agent) in the same transaction; nothing is overwritten, so :meth:`history` and :meth:`as_of` answer
  "what did I say before?".
- :meth:`forget` removes rows, FTS index entries (followed by an FTS ``optimize``, which rewrites the index
  without the deleted terms), vectors and the user's summaries that mention them; ``secure_delete=ON``
  zeroes freed pages and a WAL checkpoint(TRUNCATE) empties the log, so the text is gone from the file's
  bytes. A connection of another process reading an older snapshot blocks that checkpoint (the old pages
  are its snapshot); then the scrub is *pending*, marked in ``meta`` in the deleting transaction itself,
  and the next write, open or close of any connection completes it (see :meth:`scrub`).
- Retrieval: BM25 (FTS5 ``bm25()``) and brute-force cosine over the user's vectors (cached in memory,
  reloaded when another connection changes the DB), fused by reciprocal rank.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..user_text import InvalidTextError, check_text
from .documents import chunk_spans, chunk_title
from .embedding import Embedder, default_embedder, normalise_rows
from .errors import EmbedderMismatchError, ForeignDatabaseError, MemoryInputError, MemoryStoreError
from .records import KINDS, DocumentHit, MemoryHit, MemoryRecord
from .retrieval import Vocabulary, fts_match_expression, reciprocal_rank_fusion, text_terms, top_k_cosine
from .schema import check_sqlite_header, ensure_schema

MAX_FACT_BYTES = 1 << 20          # 1 MiB of UTF-8 per memory (a fact is a sentence; this only stops abuse)
MAX_DOCUMENT_BYTES = 10 << 20     # 10 MiB of UTF-8 per document
MAX_SUMMARY_BYTES = 1 << 20
MAX_NAME_CHARS = 256              # user, slot, session, agent, document name
MAX_SOURCE_CHARS = 1024
BUSY_TIMEOUT_MS = 30_000          # how long a writer waits for another process's transaction
SCRUB_WAIT_MS = 2_000             # how long forget/close wait for readers to let the log be emptied
FUSION_DEPTH = 50                 # candidates taken from each ranking before fusing
MODES = ("fused", "bm25", "dense")

_COLUMNS = ("id, user, text, slot, value, kind, session, agent, valid_from, valid_to, recorded_at, "
            "superseded_by, source")
_CURRENT = "valid_to IS NULL AND superseded_by IS NULL"
# meta keys: a deletion's scrub of the log is not done yet; how many forgets the DB has seen (any user)
_SCRUB_PENDING = "scrub_pending"
_DELETIONS = "deletions"

log = logging.getLogger(__name__)


def utc_now() -> str:
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds: one fixed width, so text order is time order in SQL."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive times are taken as UTC (documented)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(value: str | datetime | None, where: str) -> str | None:
    """``value`` (ISO-8601 text or datetime; naive = UTC) in the store's time format, None stays None."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, str):
        try:
            return format_time(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            pass
    raise MemoryInputError(f"{where}: expected an ISO-8601 time such as 2026-12-02T01:35:00Z, got {value!r}")


def _check_text(value: object, where: str, max_bytes: int) -> str:
    if isinstance(value, bytes):
        raise MemoryInputError(f"{where}: expected text (str), got bytes; decode it first (UTF-8)")
    try:
        text = check_text(value, where)
    except InvalidTextError as err:
        raise MemoryInputError(str(err)) from None
    if not text.strip():
        raise MemoryInputError(f"{where}: empty text; nothing to store")
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > max_bytes:
        raise MemoryInputError(f"{where}: {size:,} bytes of UTF-8, over the limit of {max_bytes:,}; nothing stored")
    return text


def _check_name(value: object, where: str, *, optional: bool = False, limit: int = MAX_NAME_CHARS) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise MemoryInputError(f"{where}: expected a non-empty string, got {type(value).__name__}")
    text = _check_text(value, where, 4 * limit)
    if len(text) > limit:
        raise MemoryInputError(f"{where}: {len(text)} characters, over the limit of {limit}")
    return text


def check_memory(user, text, *, slot=None, value=None, kind="fact", session=None, agent=None, valid_from=None,
                 source=None) -> tuple:
    """``MemoryStore.add``'s arguments checked and normalised (``MemoryInputError`` naming the field), in
    its order; callers that store many (``mamba-moe memory import``) check them all before storing any."""
    user = _check_name(user, "user")
    text = _check_text(text, "text", MAX_FACT_BYTES)
    slot = _check_name(slot, "slot", optional=True)
    value = None if value is None else _check_text(value, "value", MAX_FACT_BYTES)
    if kind not in KINDS:
        raise MemoryInputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    session = _check_name(session, "session", optional=True)
    agent = _check_name(agent, "agent", optional=True)
    source = _check_name(source, "source", optional=True, limit=MAX_SOURCE_CHARS)
    return user, text, slot, value, kind, session, agent, parse_time(valid_from, "valid_from"), source


def check_document(user, name, text, *, source=None) -> tuple[str, str, str, str | None]:
    """``MemoryStore.add_document``'s arguments checked (``MemoryInputError`` naming the field)."""
    user = _check_name(user, "user")
    name = _check_name(name, "name")
    text = _check_text(text, f"document {name!r}", MAX_DOCUMENT_BYTES)
    return user, name, text, _check_name(source, "source", optional=True, limit=MAX_SOURCE_CHARS)


def _row_record(row: tuple) -> MemoryRecord:
    return MemoryRecord(*row)


@dataclass
class _VectorCache:
    """One user's vectors in memory, with what the dense search filters on."""

    ids: np.ndarray
    matrix: np.ndarray
    session: list = field(default_factory=list)
    agent: list = field(default_factory=list)
    current: np.ndarray | None = None


class MemoryStore:
    """One memory DB file; a context manager; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike, *, embedder: Embedder | None = None, create: bool = True) -> None:
        self.path = Path(path)
        self.embedder = embedder if embedder is not None else default_embedder()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._memory_cache: dict[str, _VectorCache] = {}
        self._chunk_cache: dict[str, _VectorCache] = {}
        self._vocabulary: dict[str, Vocabulary] = {}   # FTS table -> its words and their row counts
        self._data_version: int | None = None
        self._opened = False   # set once the file is known to be a memory DB in WAL mode
        if self.path.is_dir():
            raise MemoryStoreError(f"{self.path}: is a directory; expected a memory DB file")
        if self.path.exists():
            check_sqlite_header(self.path)
        elif not create:
            raise MemoryStoreError(f"{self.path}: no such memory DB (create=False)")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_TIMEOUT_MS / 1000)
            self._open()
        except sqlite3.OperationalError as err:   # locked past the timeout, read-only, disk I/O
            self.close()
            raise MemoryStoreError(f"{self.path}: cannot open the memory DB ({err})") from None
        except sqlite3.DatabaseError as err:      # "file is not a database" and other damage
            self.close()
            raise ForeignDatabaseError(f"{self.path}: cannot be read as a memory DB ({err})") from None
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA secure_delete = ON")
        # identity first, inside a write transaction that changes nothing for a foreign or newer file, and
        # only then WAL mode (switching writes the file header)
        with self._write(scrub=False):
            ensure_schema(conn, self.path)
            self._check_embedder()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise MemoryStoreError(f"{self.path}: cannot switch to WAL journaling (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        for table in ("memories_fts", "chunks_fts"):   # per connection, in the temp schema: nothing in the file
            conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_vocab USING fts5vocab(main, {table}, row)")
        self._opened = True
        if self._scrub_pending():   # a deletion whose log scrub a reader blocked (maybe in a process since killed)
            self.scrub(wait_ms=0)

    def _check_embedder(self) -> None:
        name, dim = self.embedder.name, int(self.embedder.dim)
        stored = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('embedder', 'dim')"))
        if not stored:
            self._conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                   [("embedder", name), ("dim", str(dim))])
        elif stored.get("embedder") != name or stored.get("dim") != str(dim):
            raise EmbedderMismatchError(
                f"{self.path}: its vectors were made by embedder {stored.get('embedder')!r} (dim {stored.get('dim')}); "
                f"opened with {name!r} (dim {dim}). Open it with the same embedder, or use a new DB")

    # ---- plumbing -------------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise MemoryStoreError(f"{self.path}: the memory store is closed")
        return self._conn

    @contextmanager
    def _write(self, *, scrub: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, the write lock taken at BEGIN; rolled back on any exception. With ``scrub``,
        a pending scrub (a deletion's, maybe another connection's) is attempted after the commit, without
        waiting: a write must stay fast, and a reader still blocking it leaves it pending."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                pending = scrub and self._scrub_pending()
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                self._drop_caches()  # own uncommitted changes may have reached a cache
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._drop_caches()
                raise
            if pending:
                self.scrub(wait_ms=0)

    def _read_data_version(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def _drop_caches(self) -> None:
        self._memory_cache.clear()
        self._chunk_cache.clear()
        self._vocabulary.clear()

    def _words(self, table: str) -> Vocabulary:
        """The FTS table's words and row counts (all users': they only shape the query, nothing is returned)."""
        words = self._vocabulary.get(table)
        if words is None:
            content = table.removesuffix("_fts")
            words = Vocabulary(dict(self.conn.execute(f"SELECT term, doc FROM temp.{table}_vocab")),
                               self.conn.execute(f"SELECT count(*) FROM {content}").fetchone()[0])
            self._vocabulary[table] = words
        return words

    def _learn_words(self, table: str, rows: Iterable[Iterable[str]]) -> None:
        """Count new rows (each given by its texts) in a loaded vocabulary, instead of reloading it."""
        words = self._vocabulary.get(table)
        if words is not None:
            for texts in rows:
                words.add(term for text in texts for term in text_terms(text))

    def _fresh_caches(self) -> None:
        """Drop the vector caches when another connection committed since they were filled."""
        version = self._read_data_version()   # changes only for other connections' commits
        if version != self._data_version:
            self._drop_caches()
            self._data_version = version

    def _vector(self, text: str) -> np.ndarray:
        vector = np.asarray(self.embedder.embed([text]), dtype=np.float32)
        if vector.shape != (1, self.embedder.dim) or not np.isfinite(vector).all():
            raise MemoryStoreError(f"embedder {self.embedder.name!r}: expected one finite row of {self.embedder.dim} "
                                   f"values, got shape {vector.shape}")
        return vector[0]

    def _user(self, user: object) -> str:
        return _check_name(user, "user")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._opened and self._scrub_pending() and not self.scrub():
                        log.warning("%s: closed with the scrub of a deletion still pending (another connection "
                                    "is reading); the next open or write completes it", self.path)
                except sqlite3.Error as err:   # closing must not fail on a locked or broken DB
                    log.warning("%s: could not complete a pending scrub on close: %s", self.path, err)
                self._conn.close()
                self._conn = None
            self._drop_caches()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- facts ----------------------------------------------------------------------------------
    def _current_row(self, conn: sqlite3.Connection, user: str, slot: str, agent: str | None) -> MemoryRecord | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM memories WHERE user = ? AND slot = ? AND agent IS ? "
                           f"AND {_CURRENT} ORDER BY valid_from DESC, id DESC LIMIT 1", (user, slot, agent)).fetchone()
        return None if row is None else _row_record(row)

    def add(self, user, text, *, slot=None, value=None, kind="fact", session=None, agent=None,
            valid_from=None, source=None) -> MemoryRecord:
        """Store one memory; with ``slot``, it supersedes the user's current record of that slot (same agent)."""
        user, text, slot, value, kind, session, agent, valid_from, source = check_memory(
            user, text, slot=slot, value=value, kind=kind, session=session, agent=agent, valid_from=valid_from,
            source=source)
        vector = self._vector(text)
        with self._write() as conn:
            # the clock is read under the write lock: with two writers, "now" then follows commit order, so a
            # default valid_from is never before the current record another process just wrote
            recorded_at = utc_now()
            valid_from = valid_from or recorded_at
            old = self._current_row(conn, user, slot, agent) if slot is not None else None
            if old is not None and valid_from < old.valid_from:
                raise MemoryInputError(f"valid_from: {valid_from} is before the current {slot!r} record's "
                                       f"valid_from {old.valid_from} (id {old.id}); add facts in time order")
            cursor = conn.execute(
                "INSERT INTO memories (user, text, slot, value, kind, session, agent, valid_from, valid_to, "
                "recorded_at, superseded_by, source, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, ?, ?)",
                (user, text, slot, value, kind, session, agent, valid_from, recorded_at, source, vector.tobytes()))
            new_id = cursor.lastrowid
            conn.execute("INSERT INTO memories_fts (rowid, text) VALUES (?, ?)", (new_id, text))
            self._learn_words("memories_fts", [[text]])
            if old is not None:
                conn.execute("UPDATE memories SET valid_to = ?, superseded_by = ? WHERE id = ?",
                             (valid_from, new_id, old.id))
            cache = self._memory_cache.get(user)
            if cache is not None:
                self._memory_cache[user] = self._cache_append(cache, new_id, vector, session, agent,
                                                              None if old is None else old.id)
        return MemoryRecord(new_id, user, text, slot, value, kind, session, agent, valid_from, None, recorded_at,
                            None, source)

    @staticmethod
    def _cache_append(cache: _VectorCache, new_id: int, vector: np.ndarray, session, agent,
                      superseded: int | None) -> _VectorCache:
        current = cache.current.copy()
        if superseded is not None:
            current[cache.ids == superseded] = False
        return _VectorCache(np.append(cache.ids, new_id), np.vstack([cache.matrix, vector[None]]),
                            cache.session + [session], cache.agent + [agent], np.append(current, True))

    def retract(self, user, slot, *, at=None, agent=None) -> MemoryRecord | None:
        """End the current record of ``slot`` ("that is no longer true") without a replacement; None if none."""
        user = self._user(user)
        slot = _check_name(slot, "slot")
        agent = _check_name(agent, "agent", optional=True)
        at = parse_time(at, "at")
        with self._write() as conn:
            at = at or utc_now()
            old = self._current_row(conn, user, slot, agent)
            if old is None:
                return None
            if at < old.valid_from:
                raise MemoryInputError(f"at: {at} is before the record's valid_from {old.valid_from} (id {old.id})")
            conn.execute("UPDATE memories SET valid_to = ? WHERE id = ?", (at, old.id))
            cache = self._memory_cache.get(user)
            if cache is not None:
                cache.current[cache.ids == old.id] = False
        return dataclasses.replace(old, valid_to=at)

    def current(self, user, slot, *, agent=None) -> MemoryRecord | None:
        user = self._user(user)
        with self._lock:
            return self._current_row(self.conn, user, _check_name(slot, "slot"),
                                     _check_name(agent, "agent", optional=True))

    def history(self, user, slot, *, agent=None) -> list[MemoryRecord]:
        """Every record of ``slot`` the user has (superseded and retracted included), oldest first."""
        user = self._user(user)
        slot = _check_name(slot, "slot")
        agent = _check_name(agent, "agent", optional=True)
        with self._lock:
            rows = self.conn.execute(f"SELECT {_COLUMNS} FROM memories WHERE user = ? AND slot = ? AND agent IS ? "
                                     "ORDER BY valid_from, id", (user, slot, agent)).fetchall()
        return [_row_record(r) for r in rows]

    def as_of(self, user, slot, when, *, agent=None) -> MemoryRecord | None:
        """The record of ``slot`` that was valid at ``when`` (valid_from <= when < valid_to), or None."""
        user = self._user(user)
        slot = _check_name(slot, "slot")
        agent = _check_name(agent, "agent", optional=True)
        when = parse_time(when, "when")
        with self._lock:
            row = self.conn.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE user = ? AND slot = ? AND agent IS ? AND valid_from <= ? "
                "AND (valid_to IS NULL OR valid_to > ?) ORDER BY valid_from DESC, id DESC LIMIT 1",
                (user, slot, agent, when, when)).fetchone()
        return None if row is None else _row_record(row)

    def list(self, user, *, session=None, agent=None, include_superseded=False, limit=None) -> list[MemoryRecord]:
        """The user's records, oldest first (current ones only unless ``include_superseded``)."""
        user = self._user(user)
        where, params = self._scope(user, session, agent, include_superseded)
        sql = f"SELECT {_COLUMNS} FROM memories WHERE {where} ORDER BY id"
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise MemoryInputError(f"limit: expected an integer >= 0, got {limit!r}")
            sql += f" LIMIT {limit}"
        with self._lock:
            return [_row_record(r) for r in self.conn.execute(sql, params)]

    def existing_ids(self, user, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` are still records of the user (superseded ones included): one primary-key look-up
        each, however many records the user has."""
        user = self._user(user)
        ids = builtins.list(dict.fromkeys(ids))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise MemoryInputError(f"ids: expected integer ids, got {ids!r}")
        found: set[int] = set()
        with self._lock:
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                found.update(r[0] for r in self.conn.execute(
                    f"SELECT id FROM memories WHERE user = ? AND id IN ({','.join('?' * len(part))})", [user, *part]))
        return found

    def _scope(self, user: str, session, agent, include_superseded: bool, prefix: str = "") -> tuple[str, list]:
        clauses, params = [f"{prefix}user = ?"], [user]
        if session is not None:
            clauses.append(f"{prefix}session = ?")
            params.append(_check_name(session, "session"))
        if agent is not None:
            clauses.append(f"{prefix}agent = ?")
            params.append(_check_name(agent, "agent"))
        if not include_superseded:
            clauses.append(f"{prefix}valid_to IS NULL AND {prefix}superseded_by IS NULL")
        return " AND ".join(clauses), params

    # ---- search ---------------------------------------------------------------------------------
    def search(self, user, query, *, k=5, session=None, agent=None, include_superseded=False,
               mode="fused") -> list[MemoryHit]:
        """The user's ``k`` memories most relevant to ``query`` (current ones unless ``include_superseded``).

        ``session``/``agent`` restrict to records with exactly that session/agent.
        """
        user = self._user(user)
        query = _check_text(query, "query", MAX_FACT_BYTES)
        k = self._check_k(k)
        mode = self._check_mode(mode)
        where, params = self._scope(user, session, agent, include_superseded, prefix="m.")
        depth = k if mode != "fused" else max(k, FUSION_DEPTH)   # fusing needs at least k of each
        with self._lock:
            self._fresh_caches()
            lexical = dense = []
            if mode != "dense":
                lexical = self._bm25(f"SELECT m.id, bm25(memories_fts) FROM memories_fts JOIN memories m "
                                     f"ON m.id = memories_fts.rowid WHERE memories_fts MATCH ? AND {where} "
                                     "ORDER BY bm25(memories_fts), m.id LIMIT ?", "memories_fts", query, params, depth)
            if mode != "bm25":
                dense = self._dense(self._memory_vectors(user), query, depth, session=session, agent=agent,
                                    include_superseded=include_superseded)
            ranked = self._rank(lexical, dense, mode, k)
            if not ranked:
                return []
            ids = [item for item, _ in ranked]
            rows = {r[0]: _row_record(r) for r in self.conn.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE user = ? AND id IN ({','.join('?' * len(ids))})",
                [user, *ids])}
        return [MemoryHit(rows[i], score, rank) for rank, (i, score) in enumerate(ranked, start=1) if i in rows]

    @staticmethod
    def _check_k(k: object) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
            raise MemoryInputError(f"k: expected an integer in [1, 1000], got {k!r}")
        return k

    @staticmethod
    def _check_mode(mode: object) -> str:
        if mode not in MODES:
            raise MemoryInputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        return mode

    def _bm25(self, sql: str, table: str, query: str, params: list, depth: int) -> list[tuple[int, float]]:
        expression = fts_match_expression(query, vocabulary=self._words(table))
        if expression is None:
            return []
        # bm25() is lower-is-better; report it negated so every mode's score is higher-is-better
        return [(row_id, -score) for row_id, score in self.conn.execute(sql, [expression, *params, depth])]

    def _dense(self, cache: _VectorCache, query: str, depth: int, *, session=None, agent=None,
               include_superseded: bool = True) -> list[tuple[int, float]]:
        if cache.ids.size == 0:
            return []
        mask = np.ones(cache.ids.size, dtype=bool)
        if session is not None:
            mask &= np.fromiter((s == session for s in cache.session), dtype=bool, count=cache.ids.size)
        if agent is not None:
            mask &= np.fromiter((a == agent for a in cache.agent), dtype=bool, count=cache.ids.size)
        if not include_superseded and cache.current is not None:
            mask &= cache.current
        return [(int(cache.ids[row]), score) for row, score in top_k_cosine(cache.matrix, self._vector(query),
                                                                              depth, mask)]

    @staticmethod
    def _rank(lexical: list[tuple[int, float]], dense: list[tuple[int, float]], mode: str, k: int) -> list:
        if mode == "bm25":
            return lexical[:k]
        if mode == "dense":
            return dense[:k]
        return reciprocal_rank_fusion([[i for i, _ in lexical], [i for i, _ in dense]])[:k]

    def _memory_vectors(self, user: str) -> _VectorCache:
        cache = self._memory_cache.get(user)
        if cache is None:
            rows = self.conn.execute(f"SELECT id, vector, session, agent, {_CURRENT} FROM memories WHERE user = ? "
                                     "ORDER BY id", (user,)).fetchall()
            cache = _VectorCache(np.array([r[0] for r in rows], dtype=np.int64), self._matrix(r[1] for r in rows),
                                 [r[2] for r in rows], [r[3] for r in rows],
                                 np.array([bool(r[4]) for r in rows], dtype=bool))
            self._memory_cache[user] = cache
        return cache

    def _matrix(self, blobs: Iterable[bytes]) -> np.ndarray:
        joined = b"".join(blobs)
        return np.frombuffer(joined, dtype=np.float32).reshape(-1, self.embedder.dim).copy()

    # ---- forgetting -----------------------------------------------------------------------------
    def forget(self, user, *, ids=None, query=None, everything=False, session=None) -> int:
        """Physically remove the user's records chosen by ``ids``, ``query`` (records containing every word
        of it, superseded ones included), ``everything`` or ``session`` alone (all of that session); with
        ``session``, the choice is narrowed to that session. Returns how many records were removed.

        Also removed: their FTS entries and vectors, and the user's summaries of the sessions involved or
        whose text mentions a removed record's text or value. With ``everything``, the user's documents too.
        """
        user = self._user(user)
        chosen = sum(x is not None and x is not False for x in (ids, query, everything or None))
        if chosen > 1:
            raise MemoryInputError("forget: give one of ids, query or everything (with session to narrow it)")
        if chosen == 0 and session is None:
            raise MemoryInputError("forget: nothing chosen; give ids, query, everything or session")
        session = _check_name(session, "session", optional=True)
        where, params = self._scope(user, session, None, True)
        if ids is not None:
            ids = builtins.list(ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise MemoryInputError(f"ids: expected a non-empty list of integer ids, got {ids!r}")
            where += f" AND id IN ({','.join('?' * len(ids))})"
            params += ids
        if query is not None:
            expression = fts_match_expression(_check_text(query, "query", MAX_FACT_BYTES), require_all=True)
            if expression is None:
                raise MemoryInputError(f"query: {query!r} has no words to match")
            where += " AND id IN (SELECT rowid FROM memories_fts WHERE memories_fts MATCH ?)"
            params.append(expression)
        with self._write() as conn:
            doomed = conn.execute(f"SELECT id, text, value, session FROM memories WHERE {where}", params).fetchall()
            # with a session, "everything" is everything of that session: other sessions' summaries stay
            removed = self._delete_memories(conn, user, doomed, all_summaries=bool(everything) and session is None)
            if session is not None and (everything or chosen == 0):   # the session's summary, with or without records
                conn.execute("DELETE FROM summaries WHERE user = ? AND session = ?", (user, session))
            if everything and session is None:
                for (doc_id,) in conn.execute("SELECT id FROM documents WHERE user = ?", (user,)).fetchall():
                    self._delete_document(conn, user, doc_id)
            self._memory_cache.pop(user, None)
            self._chunk_cache.pop(user, None)
            self._vocabulary.clear()   # forgotten words must not come back as typo corrections
            self._mark_deletion(conn)
        self._scrub_after_delete()
        return removed

    def _delete_memories(self, conn: sqlite3.Connection, user: str, doomed: list[tuple], *,
                         all_summaries: bool) -> int:
        doomed_ids = [row[0] for row in doomed]
        for row_id, text, _, _ in doomed:
            conn.execute("INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', ?, ?)", (row_id, text))
        for start in range(0, len(doomed_ids), 500):
            part = doomed_ids[start:start + 500]
            marks = ",".join("?" * len(part))
            conn.execute(f"DELETE FROM memories WHERE user = ? AND id IN ({marks})", [user, *part])
            # a surviving older record keeps its valid_to (the value was not true again) but not a dangling link
            conn.execute(f"UPDATE memories SET superseded_by = NULL WHERE user = ? AND superseded_by IN ({marks})",
                         [user, *part])
        if all_summaries:
            conn.execute("DELETE FROM summaries WHERE user = ?", (user,))
        elif doomed:
            sessions = {row[3] for row in doomed if row[3] is not None}
            needles = [n.casefold() for _, text, value, _ in doomed for n in (text, value) if n and n.strip()]
            summaries = conn.execute("SELECT session, text FROM summaries WHERE user = ?", (user,)).fetchall()
            for session, summary in summaries:
                folded = summary.casefold()
                if session in sessions or any(n in folded for n in needles):
                    conn.execute("DELETE FROM summaries WHERE user = ? AND session = ?", (user, session))
        if doomed:
            # rewrite the index without the deleted terms (a 'delete' alone only adds tombstones)
            conn.execute("INSERT INTO memories_fts (memories_fts) VALUES ('optimize')")
        return len(doomed)

    @staticmethod
    def _mark_deletion(conn: sqlite3.Connection) -> None:
        """In the deleting transaction: count the deletion and mark its scrub pending. Both commit with the
        rows' removal, so a crash before the scrub still leaves the mark for the next open."""
        conn.execute("INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key) DO UPDATE "
                     "SET value = CAST(value AS INTEGER) + 1", (_DELETIONS,))
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (_SCRUB_PENDING,))

    def _scrub_pending(self) -> bool:
        return self.conn.execute("SELECT 1 FROM meta WHERE key = ?", (_SCRUB_PENDING,)).fetchone() is not None

    @property
    def scrub_pending(self) -> bool:
        """Whether a deletion's text may still be in the file's bytes (the log not emptied yet)."""
        with self._lock:
            return self._scrub_pending()

    def deletions(self) -> int:
        """How many forgets this DB has seen (any user, any connection): a reader that holds records can skip
        checking them while this is unchanged."""
        with self._lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (_DELETIONS,)).fetchone()
        return 0 if row is None else int(row[0])

    def _scrub_after_delete(self) -> None:
        if not self.scrub():
            log.warning("%s: the deleted text may stay in the write-ahead log until another connection stops "
                        "reading; the scrub is pending and the next write, open or close completes it", self.path)

    def scrub(self, *, wait_ms: int | None = None) -> bool:
        """Empty the WAL into the main file (whose freed pages secure_delete zeroed), so no page of deleted
        text survives in the file's bytes, then clear the pending mark. A reader of an older snapshot blocks
        this; it is waited for up to ``wait_ms`` (default :data:`SCRUB_WAIT_MS`). Returns whether the scrub is
        done (False: still pending, the mark stays)."""
        wait_ms = SCRUB_WAIT_MS if wait_ms is None else wait_ms
        with self._lock:
            conn = self.conn
            conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")   # TRUNCATE waits on this for readers
            try:
                if not self._checkpoint(conn):
                    return False
                if self._scrub_pending():
                    with self._write(scrub=False):
                        conn.execute("DELETE FROM meta WHERE key = ?", (_SCRUB_PENDING,))
                    self._checkpoint(conn)   # that small write's frame too (no text in it: best effort)
                return True
            except sqlite3.OperationalError:   # the write lock not had within wait_ms: stays pending
                return False
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> bool:
        """A TRUNCATE checkpoint; True when every frame reached the main file and the log is empty."""
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:   # "database is locked": another checkpoint or writer
            return False
        return busy == 0

    # ---- summaries (the conversation tier's text) -----------------------------------------------
    def put_summary(self, user, session, text, *, covers_turns: int) -> None:
        user = self._user(user)
        session = _check_name(session, "session")
        text = _check_text(text, "summary", MAX_SUMMARY_BYTES)
        if not isinstance(covers_turns, int) or isinstance(covers_turns, bool) or covers_turns < 0:
            raise MemoryInputError(f"covers_turns: expected an integer >= 0, got {covers_turns!r}")
        with self._write() as conn:
            conn.execute("INSERT INTO summaries (user, session, text, covers_turns, updated_at) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (user, session) DO UPDATE SET text = excluded.text, "
                         "covers_turns = excluded.covers_turns, updated_at = excluded.updated_at",
                         (user, session, text, covers_turns, utc_now()))

    def summary(self, user, session) -> tuple[str, int] | None:
        user = self._user(user)
        session = _check_name(session, "session")
        with self._lock:
            row = self.conn.execute("SELECT text, covers_turns FROM summaries WHERE user = ? AND session = ?",
                                    (user, session)).fetchone()
        return None if row is None else (row[0], row[1])

    # ---- documents (external memory) ------------------------------------------------------------
    def add_document(self, user, name, text, *, source=None) -> int:
        """Chunk, embed and index one document of the user; returns its id."""
        user, name, text, source = check_document(user, name, text, source=source)
        spans = chunk_spans(text)
        pieces = [text[s.start:s.end] for s in spans]
        title = chunk_title(name)
        vectors = self._chunk_vectors_for(title, pieces)
        if not np.isfinite(vectors).all():
            raise MemoryStoreError(f"embedder {self.embedder.name!r}: non-finite vectors for document {name!r}")
        with self._write() as conn:
            doc_id = conn.execute("INSERT INTO documents (user, name, source, n_chars, n_chunks, added_at) "
                                  "VALUES (?, ?, ?, ?, ?, ?)",
                                  (user, name, source, len(text), len(spans), utc_now())).lastrowid
            for span, piece, vector in zip(spans, pieces, vectors, strict=True):
                chunk_id = conn.execute('INSERT INTO chunks (doc_id, user, chunk_index, start, "end", title, text, '
                                        "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                        (doc_id, user, span.index, span.start, span.end, title, piece,
                                         vector.tobytes())).lastrowid
                conn.execute("INSERT INTO chunks_fts (rowid, title, text) VALUES (?, ?, ?)", (chunk_id, title, piece))
            self._learn_words("chunks_fts", [[title, piece] for piece in pieces])
            self._chunk_cache.pop(user, None)
        return doc_id

    def _chunk_vectors_for(self, title: str, pieces: list[str]) -> np.ndarray:
        """Each chunk's vector: its text's and the document title's unit vectors, summed and normalised, so the
        title counts as much as the body (a chunk deep in a long document still says which document it is)."""
        dim = self.embedder.dim
        body = np.asarray(self.embedder.embed(pieces), dtype=np.float32).reshape(len(pieces), dim)
        head = np.asarray(self.embedder.embed([title]), dtype=np.float32).reshape(1, dim)
        return normalise_rows(body + head)

    def search_documents(self, user, query, *, k=5, mode="fused") -> list[DocumentHit]:
        user = self._user(user)
        query = _check_text(query, "query", MAX_FACT_BYTES)
        k = self._check_k(k)
        mode = self._check_mode(mode)
        depth = k if mode != "fused" else max(k, FUSION_DEPTH)   # fusing needs at least k of each
        with self._lock:
            self._fresh_caches()
            lexical = dense = []
            if mode != "dense":
                lexical = self._bm25("SELECT c.id, bm25(chunks_fts) FROM chunks_fts JOIN chunks c "
                                     "ON c.id = chunks_fts.rowid WHERE chunks_fts MATCH ? AND c.user = ? "
                                     "ORDER BY bm25(chunks_fts), c.id LIMIT ?", "chunks_fts", query, [user], depth)
            if mode != "bm25":
                dense = self._dense(self._chunk_vectors(user), query, depth)
            ranked = self._rank(lexical, dense, mode, k)
            if not ranked:
                return []
            ids = [item for item, _ in ranked]
            rows = {r[0]: r[1:] for r in self.conn.execute(
                'SELECT c.id, c.doc_id, d.name, c.chunk_index, c.start, c."end", c.text FROM chunks c '
                f"JOIN documents d ON d.id = c.doc_id WHERE c.user = ? AND c.id IN ({','.join('?' * len(ids))})",
                [user, *ids])}
        return [DocumentHit(*rows[i], score=score, rank=rank)
                for rank, (i, score) in enumerate(ranked, start=1) if i in rows]

    def _chunk_vectors(self, user: str) -> _VectorCache:
        cache = self._chunk_cache.get(user)
        if cache is None:
            rows = self.conn.execute("SELECT id, vector FROM chunks WHERE user = ? ORDER BY id", (user,)).fetchall()
            cache = _VectorCache(np.array([r[0] for r in rows], dtype=np.int64), self._matrix(r[1] for r in rows))
            self._chunk_cache[user] = cache
        return cache

    def list_documents(self, user) -> list[tuple[int, str, int]]:
        user = self._user(user)
        with self._lock:
            return [tuple(r) for r in self.conn.execute(
                "SELECT id, name, n_chunks FROM documents WHERE user = ? ORDER BY id", (user,))]

    def forget_document(self, user, doc_id) -> int:
        """Remove one of the user's documents with its chunks, index entries and vectors; returns chunks removed
        (0 when the user has no such document)."""
        user = self._user(user)
        if not isinstance(doc_id, int) or isinstance(doc_id, bool):
            raise MemoryInputError(f"doc_id: expected an integer, got {doc_id!r}")
        with self._write() as conn:
            removed = self._delete_document(conn, user, doc_id)
            self._chunk_cache.pop(user, None)
            self._vocabulary.pop("chunks_fts", None)
            if removed:
                self._mark_deletion(conn)
        if removed:
            self._scrub_after_delete()
        return removed

    def _delete_document(self, conn: sqlite3.Connection, user: str, doc_id: int) -> int:
        chunks = conn.execute("SELECT id, title, text FROM chunks WHERE user = ? AND doc_id = ?",
                              (user, doc_id)).fetchall()
        for chunk_id, title, text in chunks:
            conn.execute("INSERT INTO chunks_fts (chunks_fts, rowid, title, text) VALUES ('delete', ?, ?, ?)",
                         (chunk_id, title, text))
        conn.execute("DELETE FROM chunks WHERE user = ? AND doc_id = ?", (user, doc_id))
        gone = conn.execute("DELETE FROM documents WHERE user = ? AND id = ?", (user, doc_id)).rowcount
        if chunks:
            conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('optimize')")
        return len(chunks) if gone else 0

    def users(self) -> list[str]:
        """Every user with a memory, summary or document (for operators; the CLI shows it only on request)."""
        with self._lock:
            return [r[0] for r in self.conn.execute(
                "SELECT user FROM memories UNION SELECT user FROM summaries UNION SELECT user FROM documents "
                "ORDER BY 1")]
