"""Sequence-level distillation: a teacher's answers become a chat dataset the SFT loader reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_moe.data.config import SourceConfig
from mamba_moe.data.sft import SFTDataset, SFTLoader
from mamba_moe.training.distill import DistillationError, load_teacher, smollm2_gguf_path
from mamba_moe.training.sequence_distill import generate_chat_dataset, read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is the capital of France?", "Name a color of the sky."]




def _read_as_sft(path: Path, tokenizer) -> SFTDataset:
    source = SourceConfig(name="distilled", kind="jsonl", domain="chat", paths=[str(path)], messages_field="messages")
    return SFTDataset.from_sources([source], tokenizer, max_tokens=4096)


def test_tiny_teacher_writes_a_chat_dataset(tmp_path, teacher_dir, tokenizer) -> None:
    teacher = load_teacher(teacher_dir)
    out = generate_chat_dataset(teacher, PROMPTS + [[{"role": "user", "content": "def f(x):"}]], tmp_path / "d.jsonl",
                                max_new_tokens=6, temperature=0.8, seed=5, system="Be brief.", keep_truncated=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for record, prompt in zip(records, PROMPTS, strict=False):
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert record["messages"][0]["content"] == "Be brief." and record["messages"][1]["content"] == prompt
    # seeded sampling: the same call writes the same file
    again = generate_chat_dataset(teacher, PROMPTS + [[{"role": "user", "content": "def f(x):"}]],
                                  tmp_path / "e.jsonl", max_new_tokens=6, temperature=0.8, seed=5, system="Be brief.",
                                  keep_truncated=True)
    assert again.read_text() == out.read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"d.jsonl", "e.jsonl"}  # no temporary file left
    with pytest.raises(DistillationError, match=r"prompts\[0\]"):
        generate_chat_dataset(teacher, [[{"role": "assistant", "content": "hi"}]], tmp_path / "x.jsonl")


def test_truncated_answers_are_dropped_or_marked(tmp_path, teacher_dir) -> None:
    """An answer cut off at max_new_tokens is not stored as a complete turn unless asked for, and then marked."""
    teacher = load_teacher(teacher_dir)
    prompts = [f"prompt number {i}" for i in range(6)]
    kept = generate_chat_dataset(teacher, prompts, tmp_path / "kept.jsonl", max_new_tokens=2, temperature=1.0,
                                 seed=3, keep_truncated=True)
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(records) == len(prompts)
    cut = sum(r.get("truncated", False) for r in records)
    assert cut >= 1  # two tokens rarely reach the random teacher's end token
    if cut == len(prompts):
        with pytest.raises(DistillationError, match="max_new_tokens=2"):
            generate_chat_dataset(teacher, prompts, tmp_path / "dropped.jsonl", max_new_tokens=2, temperature=1.0,
                                  seed=3)
        assert not (tmp_path / "dropped.jsonl").exists()
    else:
        with pytest.warns(UserWarning, match=f"{cut} of {len(prompts)}"):
            dropped = generate_chat_dataset(teacher, prompts, tmp_path / "dropped.jsonl", max_new_tokens=2,
                                            temperature=1.0, seed=3)
        rows = [json.loads(line) for line in dropped.read_text().splitlines()]
        assert rows == [{"messages": r["messages"]} for r in records if not r.get("truncated")]


def test_smollm2_answers_read_by_the_student_sft_loader(tmp_path, tokenizer) -> None:
    try:
        smollm2_gguf_path()
    except DistillationError as err:
        pytest.skip(f"SmolLM2 teacher unavailable: {err}")
    teacher = load_teacher("smollm2")
    out = generate_chat_dataset(teacher, PROMPTS, tmp_path / "smol.jsonl", max_new_tokens=12, keep_truncated=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    print(records)
    assert len(records) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert all(r["messages"][-1]["content"].strip() for r in records), "the teacher answered nothing"
    assert "Paris" in records[0]["messages"][-1]["content"]  # greedy SmolLM2-135M-Instruct knows this one
    # the student's tokenizer (512 ids, not SmolLM2's 49152) reads it through the SFT chat loader
    assert len(tokenizer) != len(teacher.tokenizer)
    dataset = _read_as_sft(out, tokenizer)
    assert len(dataset) == 2
    for ids, mask in zip(dataset.ids, dataset.masks, strict=True):
        assert int(ids.max()) < len(tokenizer) and mask[1:].sum() > 0
    batch = next(SFTLoader(dataset, seq_len=max(len(x) for x in dataset.ids), batch_size=2, pack=False))
    assert (batch.targets != -100).sum() > 0


def test_read_prompts(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt \n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", [{"role": "user", "content": "b"}]]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DistillationError, match=r"bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_cli_distill_generate(tmp_path, teacher_dir, tokenizer, capsys) -> None:
    from mamba_moe.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nimport os\n")
    out = tmp_path / "out" / "chats.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamba_moe", "distill", "generate", "--teacher", str(teacher_dir),
           "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "5", "--keep-truncated"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "2 chats" in done.stdout
    assert len(_read_as_sft(out, tokenizer)) >= 1  # an all-special answer may leave a chat untrained
    assert len(out.read_text().splitlines()) == 2
    # a missing teacher is a one-line error naming it (in-process: a second interpreter start is slow)
    assert main(cmd[3:6] + [str(tmp_path / "missing")] + cmd[7:]) == 2
    assert "missing: no such file" in capsys.readouterr().err
