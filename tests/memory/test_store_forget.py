"""forget really removes the text: not returned (also after reopening) and not in the DB's or WAL's bytes."""

from __future__ import annotations

import random
import sqlite3
import string
from pathlib import Path

import pytest

from mamba_moe.memory import MemoryStore


def _marker(rng: random.Random) -> str:
    """A lowercase word that occurs nowhere else (FTS keeps terms lowercased, so one form covers both)."""
    return "zq" + "".join(rng.choice(string.ascii_lowercase) for _ in range(10))


def _file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    for suffix in ("-wal", "-shm", "-journal"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            data += extra.read_bytes()
    return data


def _integrity(path: Path) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.execute("INSERT INTO memories_fts (memories_fts) VALUES ('integrity-check')")
    conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('integrity-check')")
    conn.close()


@pytest.mark.parametrize("how", ["ids", "query", "everything", "session"])
def test_forgotten_text_leaves_no_trace(tmp_path, fresh_seed, how):
    rng = random.Random(fresh_seed)
    secret, secret_value, kept = _marker(rng), _marker(rng), _marker(rng)
    path = tmp_path / "m.db"
    with MemoryStore(path) as store:
        for i in range(30):   # enough rows that the FTS index and tables span several pages
            store.add("alice", f"filler memory number {i} about gardening and {kept}", kind="note", session="s0")
        old = store.add("alice", f"My locker code is {secret}", slot="locker", value=secret_value, session="s1")
        new = store.add("alice", f"New locker code {secret} changed", slot="locker", value=secret_value + "x",
                        session="s1")
        store.put_summary("alice", "s1", f"Alice mentioned her locker code {secret}.", covers_turns=6)
        store.put_summary("alice", "s0", f"Gardening chat about {kept}.", covers_turns=2)
        store.add("bob", f"Bob's note about {kept}", kind="note")
        assert secret.encode() in _file_bytes(path)
        if how == "ids":
            removed = store.forget("alice", ids=[old.id, new.id])
        elif how == "query":
            removed = store.forget("alice", query=f"locker {secret}")
        elif how == "everything":
            removed = store.forget("alice", everything=True)
        else:
            removed = store.forget("alice", session="s1")
        assert removed == (32 if how == "everything" else 2)
        assert store.summary("alice", "s1") is None
        for mode in ("bm25", "dense", "fused"):
            assert not store.search("alice", f"locker code {secret}", include_superseded=True, mode=mode) or \
                all(secret not in h.record.text for h in store.search("alice", secret, mode=mode, k=50))
        assert store.history("alice", "locker") == []
        # what was not chosen survives
        assert store.search("bob", kept)[0].record.user == "bob"
        if how != "everything":
            assert len(store.list("alice")) == 30 and store.summary("alice", "s0") is not None
    data = _file_bytes(path)
    for word in (secret, secret_value):
        assert word.encode() not in data
        assert word.upper().encode() not in data
    assert kept.encode() in data
    _integrity(path)
    with MemoryStore(path) as store:   # and after a restart
        assert all(secret not in r.text for r in store.list("alice", include_superseded=True))
        assert all(secret not in h.record.text for h in store.search("alice", secret, k=50, include_superseded=True))


def test_forgotten_document_leaves_no_trace(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    secret, kept = _marker(rng), _marker(rng)
    path = tmp_path / "m.db"
    paragraphs = [f"Paragraph {i} of the handbook. It explains step {i} in detail, with {kept}." for i in range(40)]
    with MemoryStore(path) as store:
        keep_doc = store.add_document("alice", "handbook.md", "\n\n".join(paragraphs))
        doc = store.add_document("alice", "diary.md", "\n\n".join(p.replace(kept, secret) for p in paragraphs))
        assert store.search_documents("alice", secret)[0].doc_id == doc
        n_chunks = dict((i, n) for i, _, n in store.list_documents("alice"))[doc]
        assert store.forget_document("alice", doc) == n_chunks > 1
        assert [d for d, _, _ in store.list_documents("alice")] == [keep_doc]
        assert all(h.doc_id == keep_doc for h in store.search_documents("alice", secret, k=50))
    data = _file_bytes(path)
    assert secret.encode() not in data and b"diary.md" not in data
    assert kept.encode() in data
    _integrity(path)


def test_forget_of_a_superseding_record_does_not_revive_the_old_one(tmp_path):
    with MemoryStore(tmp_path / "m.db") as store:
        old = store.add("alice", "I live in Paris", slot="home", value="Paris")
        new = store.add("alice", "I live in Rome", slot="home", value="Rome")
        store.forget("alice", ids=[new.id])
        (survivor,) = store.history("alice", "home")
        assert survivor.id == old.id and survivor.superseded_by is None and survivor.valid_to == new.valid_from
        assert store.current("alice", "home") is None


def test_forget_within_a_session_keeps_the_other_sessions_summaries(tmp_path):
    with MemoryStore(tmp_path / "m.db") as store:
        store.add("alice", "I like tea", session="s1")
        store.add("alice", "I like chess", session="s2")
        for session in ("s1", "s2", "s3"):
            store.put_summary("alice", session, f"We talked in {session}.", covers_turns=1)
        assert store.forget("alice", everything=True, session="s1") == 1
        assert store.summary("alice", "s1") is None
        assert store.summary("alice", "s2") is not None and store.summary("alice", "s3") is not None
        assert store.forget("alice", session="s3") == 0   # a session with a summary and no records
        assert store.summary("alice", "s3") is None and store.summary("alice", "s2") is not None
        assert [r.text for r in store.list("alice")] == ["I like chess"]


def _copy_as_killed(path: Path, into: Path) -> Path:
    """The DB and its log as a SIGKILL would leave them (no -shm: SQLite rebuilds it from the log)."""
    into.mkdir()
    for suffix in ("", "-wal"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            (into / (path.name + suffix)).write_bytes(source.read_bytes())
    return into / path.name


@pytest.mark.parametrize("what", ["memory", "document"])
def test_a_scrub_blocked_by_a_reader_completes_once_the_reader_is_gone(tmp_path, fresh_seed, monkeypatch, caplog,
                                                                       what):
    import mamba_moe.memory.store as store_module

    monkeypatch.setattr(store_module, "SCRUB_WAIT_MS", 10)   # the reader is held explicitly: no wait ends it
    rng = random.Random(fresh_seed)
    secret, kept = _marker(rng), _marker(rng)
    path = tmp_path / "m.db"
    store = MemoryStore(path)
    for i in range(20):
        store.add("alice", f"filler memory {i} about {kept}", kind="note")
    in_memory, in_document = (secret, kept) if what == "memory" else (kept, secret)   # only what is forgotten
    record = store.add("alice", f"My bank PIN is {in_memory}", slot="pin", value=in_memory)
    doc = store.add_document("alice", "diary.md", f"Dear diary, the code is {in_document}.\n\nMore about {kept}.")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM memories").fetchone()[0] == 21   # a snapshot with the secret
    with caplog.at_level("WARNING", logger=store_module.__name__):
        if what == "memory":
            assert store.forget("alice", ids=[record.id]) == 1
        else:
            assert store.forget_document("alice", doc) >= 1
    assert store.scrub_pending and "scrub is pending" in caplog.text
    assert secret.encode() in _file_bytes(path)   # the reader's snapshot still needs the old pages
    assert all(secret not in r.text for r in store.list("alice", include_superseded=True))
    assert all(secret not in h.text for h in store.search_documents("alice", secret, k=50))
    killed = _copy_as_killed(path, tmp_path / "killed")   # a crash now leaves the pending mark in the file

    reader.execute("COMMIT")   # the reader is gone (its connection stays open, idle)
    store.add("alice", f"another note about {kept}", kind="note")   # the next write completes the scrub
    assert not store.scrub_pending
    assert secret.encode() not in _file_bytes(path) and kept.encode() in _file_bytes(path)
    assert path.with_name(path.name + "-wal").stat().st_size == 0
    store.close()
    reader.close()
    _integrity(path)
    with MemoryStore(path) as again:   # a restart never shows it
        assert all(secret not in h.record.text for h in again.search("alice", secret, k=50, include_superseded=True))

    assert secret.encode() in _file_bytes(killed)
    with MemoryStore(killed) as reopened:   # the next open completes the scrub a crash left pending
        assert not reopened.scrub_pending
        assert secret.encode() not in _file_bytes(killed)
        assert all(secret not in h.record.text for h in reopened.search("alice", secret, k=50,
                                                                        include_superseded=True))
        assert all(secret not in h.text for h in reopened.search_documents("alice", secret, k=50))
        assert len(reopened.list("alice")) == (20 if what == "memory" else 21)
    _integrity(killed)


def test_close_completes_a_pending_scrub(tmp_path, fresh_seed, monkeypatch):
    import mamba_moe.memory.store as store_module

    monkeypatch.setattr(store_module, "SCRUB_WAIT_MS", 10)
    secret = _marker(random.Random(fresh_seed))
    path = tmp_path / "m.db"
    store = MemoryStore(path)
    record = store.add("alice", f"My PIN is {secret}")
    other = MemoryStore(path)                  # a second store of this DB keeps the log from closing with us
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM memories").fetchone()
    store.forget("alice", ids=[record.id])
    assert other.scrub_pending                 # the mark is in the DB: every connection sees it
    reader.execute("COMMIT")
    other.close()                              # completes it (the store is still open: no last-close checkpoint)
    assert not store.scrub_pending and secret.encode() not in _file_bytes(path)
    store.close()
    reader.close()


def test_deletions_count_every_forget(tmp_path):
    with MemoryStore(tmp_path / "m.db") as store, MemoryStore(tmp_path / "m.db") as other:
        assert store.deletions() == 0
        record = store.add("alice", "I like tea")
        doc = store.add_document("alice", "notes.md", "Some notes about tea.")
        assert store.deletions() == 0          # writes that delete nothing do not count
        store.forget("alice", ids=[record.id])
        assert other.deletions() == 1          # seen by another connection
        other.forget_document("alice", doc)
        assert store.deletions() == 2
        assert store.forget_document("alice", doc) == 0 and store.deletions() == 2
