"""MemoryStore: supersede/history/as_of, scopes, privacy, FTS escaping, foreign/newer files, input limits."""

from __future__ import annotations

import os
import random
import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from mamba_moe.memory import (
    EmbedderMismatchError,
    ForeignDatabaseError,
    HashedNgramEmbedder,
    MemoryInputError,
    MemoryStore,
    MemoryStoreError,
    NewerSchemaError,
)
from mamba_moe.memory.schema import APPLICATION_ID, SCHEMA_VERSION
from mamba_moe.memory.store import MAX_DOCUMENT_BYTES, MAX_FACT_BYTES
from mamba_moe.user_text import InvalidTextError


@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "memory.db") as s:
        yield s


def test_supersede_keeps_history_and_as_of_answers_the_past(store):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    paris = store.add("alice", "I live in Paris", slot="home.city", value="Paris", valid_from=t0)
    berlin = store.add("alice", "I moved to Berlin", slot="home.city", value="Berlin",
                       valid_from=t0 + timedelta(days=30))
    assert store.current("alice", "home.city") == berlin
    history = store.history("alice", "home.city")
    assert [r.value for r in history] == ["Paris", "Berlin"]
    old = history[0]
    assert old.id == paris.id and old.text == "I live in Paris"   # never overwritten
    assert old.valid_to == berlin.valid_from and old.superseded_by == berlin.id and not old.is_current
    assert store.as_of("alice", "home.city", t0 + timedelta(days=1)).value == "Paris"
    assert store.as_of("alice", "home.city", "2026-01-31T00:00:00Z").value == "Berlin"
    assert store.as_of("alice", "home.city", t0 - timedelta(seconds=1)) is None
    # search sees the current value only, unless asked for the past too
    assert [h.record.value for h in store.search("alice", "where do I live", k=5)] == ["Berlin"]
    assert {h.record.value for h in store.search("alice", "Paris", include_superseded=True)} == {"Paris", "Berlin"}
    assert [r.value for r in store.list("alice")] == ["Berlin"]
    assert [r.value for r in store.list("alice", include_superseded=True)] == ["Paris", "Berlin"]


def test_retract_ends_a_fact_and_out_of_order_times_are_refused(store):
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    job = store.add("alice", "I work at Acme", slot="work.employer", value="Acme", valid_from=t0)
    with pytest.raises(MemoryInputError, match="valid_from"):
        store.add("alice", "I worked at Initech", slot="work.employer", value="Initech",
                  valid_from=t0 - timedelta(days=1))
    ended = store.retract("alice", "work.employer", at=t0 + timedelta(days=10))
    assert ended.id == job.id and ended.valid_to is not None and ended.superseded_by is None
    assert store.current("alice", "work.employer") is None
    assert store.retract("alice", "work.employer") is None
    assert store.as_of("alice", "work.employer", t0 + timedelta(days=5)).value == "Acme"
    assert store.as_of("alice", "work.employer", t0 + timedelta(days=11)) is None
    assert store.search("alice", "Acme") == []


def test_agent_and_session_scopes(store):
    store.add("alice", "My favourite colour is green", slot="fav.colour", value="green", agent="planner")
    store.add("alice", "My favourite colour is blue", slot="fav.colour", value="blue", agent="tutor",
              session="s1")
    assert store.current("alice", "fav.colour", agent="planner").value == "green"  # no cross-agent supersede
    assert store.current("alice", "fav.colour", agent="tutor").value == "blue"
    assert store.current("alice", "fav.colour") is None  # agent=None is its own scope
    assert [h.record.value for h in store.search("alice", "favourite colour", agent="tutor")] == ["blue"]
    for mode in ("bm25", "dense", "fused"):
        assert [h.record.value for h in store.search("alice", "colour", session="s1", mode=mode)] == ["blue"]
    assert [r.value for r in store.list("alice", session="s1")] == ["blue"]


def _everything_of(store: MemoryStore, user: str, query: str) -> str:
    """Every text that any read method returns for ``user`` (to check nothing of another user is there)."""
    texts = [r.text for r in store.list(user, include_superseded=True)]
    for mode in ("bm25", "dense", "fused"):
        texts += [h.record.text for h in store.search(user, query, k=50, include_superseded=True, mode=mode)]
        texts += [h.text for h in store.search_documents(user, query, k=50, mode=mode)]
    texts += [r.text for r in store.history(user, "home.city")]
    record = store.current(user, "home.city")
    texts += [record.text] if record else []
    record = store.as_of(user, "home.city", datetime.now(UTC))
    texts += [record.text] if record else []
    texts += [name for _, name, _ in store.list_documents(user)]
    summary = store.summary(user, "s1")
    texts += [summary[0]] if summary else []
    return "\n".join(texts)


def test_two_users_never_cross(store):
    store.add("alice", "Alice lives in Lisbon zebra", slot="home.city", value="Lisbon")
    store.add("bob", "Bob lives in Oslo yak", slot="home.city", value="Oslo")
    store.add_document("alice", "alice-notes.md", "Alice's secret project is codenamed zebra.")
    store.add_document("bob", "bob-notes.md", "Bob's secret project is codenamed yak.")
    store.put_summary("alice", "s1", "Alice talked about zebra things.", covers_turns=3)
    store.put_summary("bob", "s1", "Bob talked about yak things.", covers_turns=2)
    for query in ("lives in zebra yak Lisbon Oslo", "secret project codenamed", "things"):
        alice, bob = _everything_of(store, "alice", query), _everything_of(store, "bob", query)
        assert "zebra" in alice and "Lisbon" in alice and "yak" not in alice and "Oslo" not in alice
        assert "yak" in bob and "Oslo" in bob and "zebra" not in bob and "Lisbon" not in bob
    assert _everything_of(store, "carol", "zebra yak lives secret") == ""
    bob_doc = store.list_documents("bob")[0][0]
    assert store.forget_document("alice", bob_doc) == 0 and store.list_documents("bob")
    bob_id = store.current("bob", "home.city").id
    assert store.forget("alice", ids=[bob_id]) == 0 and store.current("bob", "home.city").id == bob_id
    assert store.forget("alice", query="Oslo") == 0
    assert store.forget("alice", everything=True) == 1  # her one record (and her summary and document)
    assert store.current("bob", "home.city").value == "Oslo" and store.summary("bob", "s1")
    assert store.list_documents("bob") and not store.list_documents("alice")
    assert store.users() == ["bob"]


@pytest.mark.parametrize("query", ['"a" OR NEAR(', 'NEAR(a b', '*', 'text:foo', '"', "a AND", "NOT", "-", "^x",
                                   "(((", "x' OR 1=1; DROP TABLE memories; --", "\x00", "{col}: a"])
def test_fts_syntax_in_queries_is_plain_text(store, query):
    store.add("alice", "a NEAR or not text foo col x", kind="note")
    for mode in ("bm25", "dense", "fused"):
        hits = store.search("alice", query, mode=mode)
        assert all(h.record.user == "alice" for h in hits)
    if any(c.isalnum() for c in query):   # forget by query uses the same escaping (and AND instead of OR)
        assert store.forget("alice", query=query) in (0, 1)
    assert sqlite3.connect(store.path).execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0


def test_search_ranks_the_matching_memory_first(store, fresh_seed):
    rng = random.Random(fresh_seed)
    words = ["apple", "river", "mountain", "violin", "tractor", "lantern", "meadow", "copper", "falcon", "harbor"]
    facts = [f"note {i}: " + " ".join(rng.sample(words, 3)) + f" token{i}" for i in range(40)]
    for fact in facts:
        store.add("alice", fact, kind="note")
    target = rng.randrange(len(facts))
    for mode in ("bm25", "dense", "fused"):
        hits = store.search("alice", f"token{target}", k=3, mode=mode)
        assert hits[0].record.text == facts[target]
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    # dense search is cosine against the embedder, exactly
    hits = store.search("alice", "violin meadow", k=len(facts), mode="dense")
    matrix = store.embedder.embed(facts)
    expected = matrix @ store.embedder.embed(["violin meadow"])[0]
    for hit in hits:
        assert hit.score == pytest.approx(float(expected[facts.index(hit.record.text)]), abs=1e-5)


def test_reopen_keeps_everything(tmp_path):
    path = tmp_path / "m.db"
    with MemoryStore(path) as s:
        rec = s.add("alice", "I like tea", slot="drink", value="tea", session="s1", agent="a", source="chat")
        s.put_summary("alice", "s1", "We talked about tea.", covers_turns=4)
        doc = s.add_document("alice", "doc.txt", "Tea is a drink. It is brewed from leaves.")
    with MemoryStore(path, create=False) as s:
        assert s.current("alice", "drink", agent="a") == rec
        assert s.summary("alice", "s1") == ("We talked about tea.", 4)
        assert s.list_documents("alice") == [(doc, "doc.txt", 1)]
        assert s.search("alice", "tea")[0].record == rec


def test_a_second_connection_sees_new_writes_in_search(tmp_path):
    path = tmp_path / "m.db"
    with MemoryStore(path) as reader, MemoryStore(path) as writer:
        writer.add("alice", "The first falcon", kind="note")
        assert len(reader.search("alice", "falcon", mode="dense")) == 1   # fills the reader's vector cache
        writer.add("alice", "The second falcon", kind="note")
        assert len(reader.search("alice", "falcon", mode="dense")) == 2   # the cache noticed the other writer
        writer.forget("alice", query="first")
        assert [h.record.text for h in reader.search("alice", "falcon", mode="dense")] == ["The second falcon"]


def test_not_sqlite_or_foreign_or_newer_files_are_refused_untouched(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello, I am not a database\n")
    with pytest.raises(ForeignDatabaseError, match="notes.txt"):
        MemoryStore(text_file)
    assert text_file.read_text() == "hello, I am not a database\n"

    garbage = tmp_path / "broken.db"
    garbage.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 20)
    with pytest.raises(MemoryStoreError, match="broken.db"):
        MemoryStore(garbage)

    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE accounts (id INTEGER, balance REAL)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(ForeignDatabaseError, match="other.db"):
        MemoryStore(foreign)
    assert foreign.read_bytes() == before

    newer = tmp_path / "newer.db"
    MemoryStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(NewerSchemaError, match="newer.db"):
        MemoryStore(newer)

    with pytest.raises(MemoryStoreError, match="missing.db"):
        MemoryStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(MemoryStoreError, match="is a directory"):
        MemoryStore(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "locked.db"
    MemoryStore(path).close()
    path.chmod(0)
    try:
        with pytest.raises(MemoryStoreError, match="locked.db"):
            MemoryStore(path)
    finally:
        path.chmod(0o600)


def test_an_empty_file_becomes_a_memory_db(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    with MemoryStore(path) as s:
        s.add("alice", "hello there")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_another_embedder_is_refused(tmp_path):
    path = tmp_path / "m.db"
    MemoryStore(path).close()
    with pytest.raises(EmbedderMismatchError, match="hashed-ngram"):
        MemoryStore(path, embedder=HashedNgramEmbedder(dim=128))


def _count_rows(store: MemoryStore) -> tuple[int, ...]:
    conn = sqlite3.connect(store.path)
    return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("memories", "chunks", "documents", "summaries"))


def test_bad_input_is_refused_and_nothing_is_stored(store):
    store.add("alice", "baseline fact", slot="x", value="1")
    before = _count_rows(store)
    bad_calls = [
        lambda: store.add("alice", "x" * (MAX_FACT_BYTES + 1)),
        lambda: store.add("alice", "é" * (MAX_FACT_BYTES // 2 + 1)),   # counted in UTF-8 bytes, not characters
        lambda: store.add("alice", "bad \udcff byte"),
        lambda: store.add("alice", "lone \ud800 surrogate"),
        lambda: store.add("alice", b"bytes are not text"),
        lambda: store.add("alice", "   "),
        lambda: store.add("", "text"),
        lambda: store.add(None, "text"),
        lambda: store.add("u\udc80", "text"),
        lambda: store.add("alice", "text", kind="gossip"),
        lambda: store.add("alice", "text", slot="s" * 300),
        lambda: store.add("alice", "text", slot="x", valid_from="yesterday-ish"),
        lambda: store.add_document("alice", "big.txt", "word " * (MAX_DOCUMENT_BYTES // 5 + 1)),
        lambda: store.add_document("alice", "bad.txt", "ok text \udcfe then"),
        lambda: store.put_summary("alice", "s1", "", covers_turns=1),
        lambda: store.put_summary("alice", "s1", "fine", covers_turns=-1),
        lambda: store.search("alice", "q", k=0),
        lambda: store.search("alice", "q", mode="semantic"),
        lambda: store.forget("alice"),
        lambda: store.forget("alice", ids=[1], everything=True),
        lambda: store.forget("alice", ids=["1"]),
    ]
    for call in bad_calls:
        with pytest.raises(MemoryInputError):
            call()
    assert _count_rows(store) == before
    assert store.current("alice", "x").value == "1"
    with pytest.raises(InvalidTextError, match="text"):   # servers catching InvalidTextError catch these too
        store.add("alice", "bad \udcff byte")


def test_exactly_at_the_limit_is_accepted(store):
    record = store.add("alice", "y" * MAX_FACT_BYTES, kind="note")
    assert len(store.list("alice")[0].text) == MAX_FACT_BYTES and record.id


def test_vectors_are_float32_unit_rows(store):
    rec = store.add("alice", "The quick brown fox")
    blob = sqlite3.connect(store.path).execute("SELECT vector FROM memories WHERE id = ?", (rec.id,)).fetchone()[0]
    vector = np.frombuffer(blob, dtype=np.float32)
    assert vector.shape == (store.embedder.dim,)
    np.testing.assert_allclose(vector, store.embedder.embed(["The quick brown fox"])[0], rtol=0, atol=0)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_a_large_k_gets_k_hits_in_every_mode(store):
    for i in range(120):
        store.add("alice", f"apple note number {i}", kind="note")
    for mode in ("bm25", "dense", "fused"):   # fused takes max(k, FUSION_DEPTH) candidates from each list
        hits = store.search("alice", "apple note", k=100, mode=mode)
        assert len(hits) == 100 and len({h.record.id for h in hits}) == 100, mode
