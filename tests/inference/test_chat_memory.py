"""``mamba-moe chat --memory DB --user NAME`` (the command's ``main``, standard input a text stream): facts
persist across runs, the memory commands work, and bad memory flags or files are clear errors (exit 2,
no traceback). Each run opens and closes the DB as a separate process would."""

from __future__ import annotations

import io
import sys

import pytest
from helpers import serving
from helpers.toy import save_toy_checkpoint

from mamba_moe.cli import main
from mamba_moe.memory import MemoryStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"), seed=serving.TOY_SEED)


def chat(checkpoint, db, lines: str, *flags: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", str(checkpoint), "--threads", "1", "--max-tokens", "4", "--temperature", "0",
                 "--memory", str(db), *flags])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    return out


def test_memory_persists_across_chats_and_can_be_deleted(checkpoint, tmp_path, monkeypatch, capsys):
    db = tmp_path / "memory.db"
    io_ = {"monkeypatch": monkeypatch, "capsys": capsys}
    out = chat(checkpoint, db, "Hi, I'm Ada. I live in Paris.\n/memories\n/exit\n", "--user", "ada", **io_)
    assert "user 'ada'" in out and "The user lives in Paris." in out
    with MemoryStore(db) as store:
        assert store.current("ada", "city").value == "Paris" and store.list("bob") == []
    out = chat(checkpoint, db, "/memories\n/forget Paris\n/memories\n/undo\n/forget ?!\n/memories\n/exit\n",
               "--user", "ada", **io_)
    replies = out.split(">>> ")[1:]
    assert "Paris" in replies[0] and replies[1].startswith("(1 memories deleted)")
    assert "Paris" not in replies[2] and "The user's name is Ada." in replies[2]
    assert replies[3].startswith("(nothing to undo)")
    assert replies[4].startswith("error: query") and "The user's name is Ada." in replies[5]   # the chat went on
    out = chat(checkpoint, db, "/memories\n/exit\n", "--user", "bob", **io_)       # another user sees nothing
    assert "(nothing remembered)" in out


def test_memory_flags_and_files_are_checked(checkpoint, tmp_path, capsys):
    assert main(["chat", str(checkpoint), "--user", "ada"]) == 2
    assert "only with --memory" in capsys.readouterr().err
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n" * 10)
    assert main(["chat", str(checkpoint), "--memory", str(foreign), "--user", "ada"]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "Traceback" not in err
    assert foreign.read_text() == "not a database\n" * 10                    # left as it was
    assert main(["chat", str(tmp_path / "model.gguf"), "--memory", str(tmp_path / "m.db"), "--user", "ada"]) == 2
    err = capsys.readouterr().err
    assert "--memory" in err and "GGUF" in err and "Traceback" not in err
