"""The memory DB's schema: how a file is recognised as ours, and the steps that build or migrate it.

A memory DB carries ``PRAGMA application_id`` = :data:`APPLICATION_ID` and ``PRAGMA user_version`` = the
number of migration steps applied. Opening a file therefore decides between exactly these cases:

- not an SQLite file at all, or an SQLite file with another application id or with tables of its own
  -> :class:`ForeignDatabaseError` naming the file (we never write into someone else's DB);
- a newer ``user_version`` than :data:`MIGRATIONS` knows -> :class:`NewerSchemaError`;
- an empty file or a fresh one -> every step runs; an older version -> the missing steps run, all in the
  opener's one write transaction, so a crash mid-migration leaves the old version intact.

Full-text tables are FTS5 *external-content* tables over ``memories.text`` and ``chunks.(title, text)``
(``title`` is the document's name, indexed with every chunk so that a chunk deep in a document still
carries what the document is about, the "contextual chunk header" of retrieval practice): the text is
stored once, and the store writes the index entries in the same transaction as the rows (never triggers
hidden from the reader of ``store.py``; the ``'delete'`` command needs the old text, which the store has).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from .errors import ForeignDatabaseError, MemoryStoreError, NewerSchemaError

APPLICATION_ID = 0x4D4D454D   # "MMEM": mamba-moe memory
SQLITE_MAGIC = b"SQLite format 3\x00"

# unicode61 with diacritics folded: "Zoë" matches "zoe"; the same tokenizer for memories and chunks
_FTS_TOKENIZER = "unicode61 remove_diacritics 2"

_V1 = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE memories (
    id            INTEGER PRIMARY KEY,
    user          TEXT NOT NULL,
    text          TEXT NOT NULL,
    slot          TEXT,
    value         TEXT,
    kind          TEXT NOT NULL,
    session       TEXT,
    agent         TEXT,
    valid_from    TEXT NOT NULL,
    valid_to      TEXT,
    recorded_at   TEXT NOT NULL,
    superseded_by INTEGER,
    source        TEXT,
    vector        BLOB NOT NULL
);
CREATE INDEX memories_user_slot ON memories (user, slot, agent);
CREATE INDEX memories_user_session ON memories (user, session);
CREATE VIRTUAL TABLE memories_fts USING fts5(text, content='memories', content_rowid='id',
                                             tokenize='{_FTS_TOKENIZER}');
CREATE TABLE summaries (
    user         TEXT NOT NULL,
    session      TEXT NOT NULL,
    text         TEXT NOT NULL,
    covers_turns INTEGER NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (user, session)
);
CREATE TABLE documents (
    id        INTEGER PRIMARY KEY,
    user      TEXT NOT NULL,
    name      TEXT NOT NULL,
    source    TEXT,
    n_chars   INTEGER NOT NULL,
    n_chunks  INTEGER NOT NULL,
    added_at  TEXT NOT NULL
);
CREATE INDEX documents_user ON documents (user);
CREATE TABLE chunks (
    id          INTEGER PRIMARY KEY,
    doc_id      INTEGER NOT NULL REFERENCES documents (id),
    user        TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    start       INTEGER NOT NULL,
    "end"       INTEGER NOT NULL,
    title       TEXT NOT NULL,
    text        TEXT NOT NULL,
    vector      BLOB NOT NULL
);
CREATE INDEX chunks_user ON chunks (user, doc_id);
CREATE VIRTUAL TABLE chunks_fts USING fts5(title, text, content='chunks', content_rowid='id',
                                           tokenize='{_FTS_TOKENIZER}');
"""


def _step_v1(conn: sqlite3.Connection) -> None:
    for statement in _V1.split(";"):
        if statement.strip():
            conn.execute(statement)


# MIGRATIONS[i] takes a DB from user_version i to i + 1. Append new steps; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_step_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def check_sqlite_header(path: Path) -> None:
    """:class:`ForeignDatabaseError` unless ``path`` is empty or starts with SQLite's magic header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise MemoryStoreError(f"{path}: cannot read the memory DB ({err.strerror or err})") from None
    if head and head != SQLITE_MAGIC:
        raise ForeignDatabaseError(f"{path}: not an SQLite file, so not a memory DB (its first bytes are "
                                   f"{head[:8]!r}); give a new file name or the right DB")


def ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Check the DB's identity and bring it to :data:`SCHEMA_VERSION`; the caller holds a write transaction."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != 0 or version != 0 or tables:
            raise ForeignDatabaseError(
                f"{path}: an SQLite file of another program (application_id {app_id:#x}, {tables} schema "
                f"objects), not a memory DB; refusing to write into it")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(f"{path}: written by a newer mamba-moe (memory schema version {version}; this one "
                               f"knows up to {SCHEMA_VERSION}); upgrade mamba-moe to open it")
    for step in MIGRATIONS[version:]:
        step(conn)
    if version != SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
