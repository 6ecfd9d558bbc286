"""`mamba-moe memory ...`: each action, privacy between users, import checks, exit codes."""

from __future__ import annotations

import json

import pytest

from mamba_moe.cli import main
from mamba_moe.memory import MemoryStore


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["memory", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "memory.db")


def test_add_search_history_list(capsys, db):
    assert run(capsys, "add", "--db", db, "--user", "alice", "I live in Paris", "--slot", "home.city",
               "--value", "Paris", "--valid-from", "2026-01-01T00:00:00Z")[0] == 0
    code, out, _ = run(capsys, "add", "--db", db, "--user", "alice", "I moved to Berlin", "--slot", "home.city",
                       "--value", "Berlin", "--json")
    assert code == 0 and rows(out)[0]["value"] == "Berlin"
    code, out, _ = run(capsys, "search", "--db", db, "--user", "alice", "where do I live", "--json")
    assert code == 0 and [h["record"]["value"] for h in rows(out)] == ["Berlin"]
    code, out, _ = run(capsys, "history", "--db", db, "--user", "alice", "home.city")
    assert code == 0 and out.index("Paris") < out.index("Berlin") and "(past)" in out
    code, out, _ = run(capsys, "list", "--db", db, "--user", "alice", "--all-versions", "--json")
    assert [r["value"] for r in rows(out)] == ["Paris", "Berlin"]
    assert run(capsys, "history", "--db", db, "--user", "alice", "work")[0] == 1


def test_users_never_cross_through_the_cli(capsys, db, tmp_path):
    run(capsys, "add", "--db", db, "--user", "alice", "Alice's pin is 4455 walrus")
    run(capsys, "add", "--db", db, "--user", "bob", "Bob's pin is 9911 pelican")
    doc = tmp_path / "bob-diary.md"
    doc.write_text("Bob hid the pelican key under the mat.\n")
    run(capsys, "import", "--db", db, "--user", "bob", str(doc))
    for argv in (["search", "pin walrus pelican key"], ["search", "pelican key", "--documents"],
                 ["search", "pelican", "--mode", "bm25"], ["search", "pelican", "--mode", "dense"],
                 ["list", "--all-versions", "--documents"]):
        _, out, _ = run(capsys, argv[0], "--db", db, "--user", "alice", *argv[1:], "--json")
        assert "pelican" not in out and "9911" not in out and "bob" not in out.lower()
        _, out, _ = run(capsys, argv[0], "--db", db, "--user", "bob", *argv[1:], "--json")
        assert "walrus" not in out and "4455" not in out
    code, _, _ = run(capsys, "forget", "--db", db, "--user", "alice", "--query", "pelican")
    assert code == 1   # alice has nothing of bob's to forget
    with MemoryStore(db) as store:
        bob_id = store.list("bob")[0].id
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--id", str(bob_id))[0] == 1
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--all")[0] == 0
    with MemoryStore(db) as store:
        assert [r.text for r in store.list("bob")] == ["Bob's pin is 9911 pelican"]
        assert len(store.list_documents("bob")) == 1 and store.list("alice") == []


def test_forget_by_id_query_session_and_document(capsys, db, tmp_path):
    for text, session in (("one red apple", "s1"), ("two red cars", "s1"), ("three blue boats", "s2")):
        run(capsys, "add", "--db", db, "--user", "alice", text, "--session", session)
    doc = tmp_path / "notes.txt"
    doc.write_text("A short note about boats.")
    _, out, _ = run(capsys, "import", "--db", db, "--user", "alice", str(doc), "--json")
    doc_id = rows(out)[0]["doc_id"]
    with MemoryStore(db) as store:
        ids = {r.text: r.id for r in store.list("alice")}
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--id", str(ids["one red apple"]))[0] == 0
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--query", "red cars")[0] == 0
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--session-only")[0] == 2   # needs --session
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--session-only", "--session", "s2")[0] == 0
    assert run(capsys, "forget", "--db", db, "--user", "alice", "--document", str(doc_id))[0] == 0
    with MemoryStore(db) as store:
        assert store.list("alice", include_superseded=True) == [] and store.list_documents("alice") == []


def test_import_checks_every_file_before_storing(capsys, db, tmp_path):
    good = tmp_path / "facts.jsonl"
    good.write_text(json.dumps({"text": "I like tea", "slot": "drink", "value": "tea"}) + "\n\n" +
                    json.dumps({"text": "Met Ana at the fair", "kind": "event", "session": "s1"}) + "\n")
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txet": "typo"}) + "\n")
    code, _, err = run(capsys, "import", "--db", db, "--user", "alice", str(good), str(bad))
    assert code == 2 and "broken.jsonl:2" in err and "txet" in err
    assert not (tmp_path / "memory.db").exists()   # nothing stored: not even the DB was created
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": "x" * (2 << 20)}) + "\n")
    code, _, err = run(capsys, "import", "--db", db, "--user", "alice", str(good), str(huge))
    assert code == 2 and "huge.jsonl:1" in err and "limit" in err
    assert not (tmp_path / "memory.db").exists()   # the store's own checks ran before the good file was stored
    binary = tmp_path / "photo.md"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    code, _, err = run(capsys, "import", "--db", db, "--user", "alice", str(binary))
    assert code == 2 and "photo.md" in err and "UTF-8" in err
    code, _, err = run(capsys, "import", "--db", db, "--user", "alice", str(tmp_path / "missing.md"))
    assert code == 2 and "missing.md" in err
    assert run(capsys, "import", "--db", db, "--user", "alice", str(good))[0] == 0
    with MemoryStore(db) as store:
        assert {r.text for r in store.list("alice")} == {"I like tea", "Met Ana at the fair"}
        assert store.current("alice", "drink").value == "tea"


def test_bad_db_files_and_arguments_give_clear_errors(capsys, tmp_path, db):
    code, _, err = run(capsys, "search", "--db", str(tmp_path / "none.db"), "--user", "alice", "q")
    assert code == 2 and "none.db" in err
    assert not (tmp_path / "none.db").exists()
    text = tmp_path / "readme.txt"
    text.write_text("not a database")
    code, _, err = run(capsys, "list", "--db", str(text), "--user", "alice")
    assert code == 2 and "readme.txt" in err and "not an SQLite file" in err
    code, _, err = run(capsys, "add", "--db", db, "--user", "alice", "bad \udcff byte")   # argv's surrogateescape
    assert code == 2 and "UTF-8" in err
    code, _, err = run(capsys, "add", "--db", db, "--user", "", "text")
    assert code == 2 and "user" in err
