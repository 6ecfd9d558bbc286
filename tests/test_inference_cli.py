"""``mamba-moe generate`` in-process, and ``mamba-moe chat`` driven through a pseudo-terminal."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mamba_moe.cli import main
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.toy import save_toy_checkpoint

pexpect = pytest.importorskip("pexpect")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint)


def test_generate_prints_prompt_and_completion(checkpoint, engine, capsys):
    assert main(["generate", str(checkpoint), "Hello, how", "--max-tokens", "8", "--temperature", "0"]) == 0
    expected = engine.generate("Hello, how", SamplingParams(max_tokens=8, temperature=0)).text
    assert capsys.readouterr().out == "Hello, how" + expected + "\n"


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def terminal_text(raw: str) -> str:
    return raw.replace("\r\n", "\n")


def test_chat_in_a_pseudo_terminal(checkpoint, engine):
    seed = int(torch.randint(0, 2**31, ()))
    child = pexpect.spawn(sys.executable, ["-m", "mamba_moe", "chat", str(checkpoint), "--threads", "1",
                                           "--max-tokens", "12", "--temperature", "0.9", "--seed", str(seed)],
                          encoding="utf-8", timeout=90, dimensions=(50, 400),
                          env={**os.environ, "TERM": "dumb"})   # no terminal escape sequences around the prompt
    try:
        child.expect_exact(">>> ")
        params = SamplingParams(max_tokens=12, temperature=0.9, seed=seed)

        def ask(text: str) -> str:
            child.sendline(text)
            child.expect_exact(text + "\r\n")           # the terminal echoes the line typed
            child.expect_exact(">>> ")
            return terminal_text(child.before)

        messages = [{"role": "user", "content": "Hello there!"}]
        reply = ask("Hello there!")
        expected = engine.chat(messages, params).text
        assert reply == expected + "\n"

        messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": "And then?"}]
        assert ask("And then?") == engine.chat(messages, params).text + "\n"   # the history is kept

        assert ask("/system Be brief.") == "(system prompt set)\n"
        assert ask("/clear") == "(conversation cleared)\n"
        fresh = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert ask("Hi") == engine.chat(fresh, params).text + "\n"
        assert "unknown command" in ask("/nope")

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
