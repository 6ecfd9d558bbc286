"""Crash safety: SIGKILL in the middle of writes loses no committed memory; two writer processes lose nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mamba_moe.memory import MemoryStore

# Writes forever (or `count` times), printing a line after each commit: "<kind> <id> <text>".
_WRITER = textwrap.dedent("""
    import sys
    from mamba_moe.memory import MemoryStore
    path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with MemoryStore(path) as store:
        i = 0
        while count < 0 or i < count:
            rec = store.add("alice", f"{tag} fact number {i} about item{tag}{i}", slot="shared.slot",
                            value=f"{tag}{i}", session=f"s{i % 3}")
            print("fact", rec.id, rec.text, flush=True)
            if i % 5 == 4:
                doc = store.add_document("alice", f"{tag}-doc{i}.md", f"Doc {i} of {tag}. " * 50)
                print("doc", doc, f"{tag}-doc{i}.md", flush=True)
            if i % 7 == 6:
                store.put_summary("alice", f"s{i % 3}", f"summary {tag} {i}", covers_turns=i)
            i += 1
""")


def _start_writer(path: Path, tag: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def _check_consistent(path: Path) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.execute("INSERT INTO memories_fts (memories_fts) VALUES ('integrity-check')")   # raises when corrupt
    conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('integrity-check')")
    # the FTS index holds exactly the rows (external content: each row's terms are findable)
    n_rows = conn.execute("SELECT count(*) FROM memories").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'fact'").fetchone()[0] == n_rows
    # one current record per slot, and a complete chain of supersedes
    assert conn.execute("SELECT count(*) FROM memories WHERE valid_to IS NULL AND superseded_by IS NULL")\
        .fetchone()[0] == (1 if n_rows else 0)
    assert conn.execute("SELECT count(*) FROM memories WHERE superseded_by IS NOT NULL").fetchone()[0] == n_rows - 1
    conn.close()


def _committed(lines: list[str]) -> tuple[dict[int, str], dict[int, str]]:
    facts, docs = {}, {}
    for line in lines:
        kind, ident, text = line.rstrip("\n").split(" ", 2)
        (facts if kind == "fact" else docs)[int(ident)] = text
    return facts, docs


@pytest.mark.slow
def test_sigkill_mid_writes_loses_no_committed_memory(tmp_path):
    path = tmp_path / "m.db"
    MemoryStore(path).close()
    child = _start_writer(path, "k", -1)
    lines = []
    try:
        for line in child.stdout:   # kill while it is writing: after 40 commits it is in the middle of the next
            lines.append(line)
            if len(lines) >= 40:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    # the lines the child printed between our 40th read and the kill are still in the pipe: without them,
    # "at most one uncommitted-looking write" below would depend on how fast the child ran on
    lines += [line for line in child.stdout.readlines() if line.endswith("\n")]
    facts, docs = _committed(lines)
    _check_consistent(path)
    with MemoryStore(path) as store:
        stored = {r.id: r.text for r in store.list("alice", include_superseded=True)}
        assert facts.items() <= stored.items()     # every committed write is there, unchanged
        assert len(stored) - len(facts) <= 1       # at most the one whose "committed" line was not read yet
        listed = {i: name for i, name, _ in store.list_documents("alice")}
        assert docs.items() <= listed.items()
        newest = max(stored)
        assert store.search("alice", f"item{stored[newest].split('item')[1]}", k=1)[0].record.id == newest
        store.add("alice", "written after the crash", kind="note")   # and the DB takes new writes


@pytest.mark.slow
def test_two_processes_writing_one_db_lose_nothing(tmp_path):
    path = tmp_path / "m.db"
    MemoryStore(path).close()
    children = [_start_writer(path, tag, 25) for tag in ("p", "q")]
    outputs = [child.communicate(timeout=240) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    facts, docs = {}, {}
    for out, _ in outputs:
        f, d = _committed(out.splitlines())
        facts.update(f)
        docs.update(d)
    assert len(facts) == 50 and len(docs) == 10
    _check_consistent(path)
    with MemoryStore(path) as store:
        stored = {r.id: r.text for r in store.list("alice", include_superseded=True)}
        assert stored == facts
        assert {i: name for i, name, _ in store.list_documents("alice")} == docs
        chain = store.history("alice", "shared.slot")
        assert len(chain) == 50 and chain[-1].is_current
        # each record was superseded by the next one in time: the read-then-write of a supersede was atomic
        for older, newer in zip(chain, chain[1:], strict=False):
            assert older.superseded_by == newer.id and older.valid_to == newer.valid_from
