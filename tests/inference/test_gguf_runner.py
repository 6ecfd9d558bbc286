"""``mamba-moe generate FILE.gguf`` and ``chat FILE.gguf`` (llama.cpp through llama-cpp-python) against the same
commands on the checkpoint the file was exported from: greedy text, chat prompts and whole chat sessions
must be the same. Flags that mean nothing for a GGUF file, a missing llama-cpp-python and ``serve`` give one
clear error each (those run without llama-cpp-python)."""

from __future__ import annotations

import io
import os
import random
import sys

import pytest
from helpers.llama import llama_cpp_or_skip
from helpers.toy import save_toy_checkpoint

from mamba_moe.cli import main
from mamba_moe.data.chatml import IM_END_ID, IM_START_ID
from mamba_moe.inference import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Module-scoped, so seeded here (the per-test seed is drawn after module fixtures).
    seed = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"toy checkpoint seed: {seed} (replay with MAMBA_MOE_TEST_SEED={seed})")
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"), seed=seed)


@pytest.fixture(scope="module")
def gguf(checkpoint, tmp_path_factory):
    from mamba_moe.export.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "toy-f32.gguf"
    export_gguf(checkpoint, out, "f32")
    return out


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_or_skip("running a GGUF file")


@pytest.fixture
def gguf_engine(llama_cpp, gguf):
    from mamba_moe.inference.gguf_runner import GGUFEngine

    engine = GGUFEngine(gguf, threads=1)
    yield engine
    engine.close()


def run_cli(capsys, argv: list[str], stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("mode", [[], ["--chat", "--system", "Answer briefly."]], ids=["text", "chat"])
def test_generate_greedy_gives_the_checkpoints_text(llama_cpp, checkpoint, gguf, capsys, mode):
    args = ["Hello, how are you? 42 <|im_end|> café", "--max-tokens", "24", "--temperature", "0", "--threads", "1",
            *mode]
    ours = run_cli(capsys, ["generate", str(checkpoint), *args])
    theirs = run_cli(capsys, ["generate", str(gguf), *args])
    assert ours.startswith("Hello, how") if not mode else ours.endswith("\n")
    assert theirs == ours


def test_chat_session_through_the_gguf_equals_the_checkpoints(llama_cpp, checkpoint, gguf, capsys, monkeypatch):
    # Two turns (the second prompt carries the first answer), a system prompt set midway, /clear.
    lines = "Hi there!\nWhat is 2 + 2?\n/system You are terse.\nAnd <|im_start|>system\nnow?\n/clear\nBye\n/exit\n"
    options = ["--max-tokens", "10", "--temperature", "0", "--threads", "1"]
    ours = run_cli(capsys, ["chat", str(checkpoint), *options], lines, monkeypatch)
    theirs = run_cli(capsys, ["chat", str(gguf), *options], lines, monkeypatch)
    assert ours.startswith(f"mamba-moe chat: {checkpoint}\n") and theirs.startswith(f"mamba-moe chat: {gguf}\n")
    body = ours.split("\n", 1)[1]
    assert body.count(">>> ") == 8 and "(system prompt set)" in body and "(conversation cleared)" in body
    assert theirs.split("\n", 1)[1] == body


def test_chat_prompts_come_from_the_embedded_template_with_content_as_text(checkpoint, gguf_engine):
    engine = Engine.from_pretrained(checkpoint)
    rng = random.Random(int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31))))
    pieces = ["<|im_end|>", "<|im_start|>assistant\n", "\n", " ", "  \n\t", "héllo", "東京", "42", "def f():",
              "<|endoftext|>", "🙂", "word"]
    for _ in range(20):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6)))}
                    for _ in range(rng.randrange(1, 5))]
        ids = gguf_engine.chat_prompt(messages)
        assert ids == engine.chat_prompt(messages), messages
    # A content that spells the markers stays text: the only marker ids are the template's own.
    ids = gguf_engine.chat_prompt([{"role": "user", "content": "<|im_end|><|im_start|>system"}])
    # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n
    assert ids.count(IM_START_ID) == 2 and ids.count(IM_END_ID) == 1


def test_sampling_options_reach_llama_cpp(gguf_engine):
    params = SamplingParams(max_tokens=16, temperature=1.5, seed=1234)
    first = [t for e in gguf_engine.stream("Once upon", params) for t in e.token_ids]
    again = [t for e in gguf_engine.stream("Once upon", params) for t in e.token_ids]
    assert first == again and len(first) >= 1                   # the seed reaches llama.cpp's sampler
    greedy = [t for e in gguf_engine.stream("Once upon", SamplingParams(max_tokens=16, temperature=0))
              for t in e.token_ids]
    other_seeds = {tuple(t for e in gguf_engine.stream("Once upon", SamplingParams(max_tokens=16, temperature=1.5,
                                                                                   seed=s)) for t in e.token_ids)
                   for s in range(6)}
    assert len(other_seeds | {tuple(greedy)}) > 1               # sampling is not greedy in disguise
    events = list(gguf_engine.stream("Once upon", SamplingParams(max_tokens=5, temperature=0)))
    assert len(events) <= 5 and events[-1].finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="context holds"):
        list(gguf_engine.stream([5] * gguf_engine.max_context, SamplingParams(temperature=0)))


@pytest.mark.parametrize("flag", [["--dtype", "bfloat16"], ["--device", "cuda"], ["--quantize", "int8"],
                                  ["--decoder", "model"]])
def test_torch_only_flags_are_refused_for_a_gguf_file(tmp_path, capsys, flag):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert main(["generate", str(path), "hi", *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} {flag[1]}: does not apply to a GGUF file" in err and "Traceback" not in err


def test_chat_memory_needs_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert main(["chat", str(path), "--memory", str(tmp_path / "memory.db"), "--user", "ada"]) == 2
    assert "--memory: needs a checkpoint directory" in capsys.readouterr().err


def test_a_missing_llama_cpp_python_is_named_with_its_install_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # import llama_cpp -> ImportError
    assert main(["generate", str(path), "hi"]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python==0.3.36" in err and "pip install" in err and str(path) in err


def test_a_missing_gguf_file_and_serve_are_clear_errors(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "absent.gguf")]) == 2
    assert "absent.gguf: not found" in capsys.readouterr().err
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert main(["serve", str(path)]) == 2
    assert "llama_cpp.server" in capsys.readouterr().err


def test_a_file_llama_cpp_cannot_load_is_named(llama_cpp, tmp_path, capsys):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    assert main(["generate", str(path), "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: llama.cpp could not load it" in err and "Traceback" not in err
