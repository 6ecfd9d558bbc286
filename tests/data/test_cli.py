"""`mamba-moe data` commands end to end on a small corpus, and the shipped data configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers.data import random_docs, write_jsonl

from mamba_moe.data.cli import main
from mamba_moe.data.config import PrepareConfig
from mamba_moe.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_train_prepare_inspect(tmp_path, fresh_seed, capsys):
    rng = random.Random(fresh_seed)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(random_docs(rng, 40)):
        (corpus / f"d{i}.txt").write_text(text, encoding="utf-8")
    assert main(["data", "train-tokenizer", str(corpus), "--output", str(tmp_path / "tok"), "--vocab-size", "400"]) == 0
    out = capsys.readouterr().out
    assert "'llama-bpe'" in out and len(load_tokenizer(tmp_path / "tok")) <= 400

    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}])
    config = tmp_path / "prep.yaml"
    config.write_text(f"""
tokenizer: {tmp_path / 'tok'}
output: {tmp_path / 'shards'}
val_fraction: 0.1
workers: 1
sources:
  - {{name: text, kind: files, domain: web, paths: ["{corpus}/*.txt"]}}
  - {{name: chat, kind: jsonl, domain: chat, paths: ["{tmp_path / 'chat.jsonl'}"], messages_field: messages}}
""")
    assert main(["data", "prepare", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "shard(s) written" in out and "chat" in out
    assert main(["data", "prepare", "--config", str(config), "--no-progress"]) == 0
    assert "0 shard(s) written" in capsys.readouterr().out  # incremental

    assert main(["data", "inspect", str(tmp_path / "shards"), "--seed", str(fresh_seed), "--sample-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert "text" in out and "chat" in out and "sample:" in out and "tokens in" in out
    assert main(["data", "inspect", str(tmp_path / "shards"), "--sample-tokens", "0"]) == 0
    assert "sample:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a negative length used to cut the sample from its end
        main(["data", "inspect", str(tmp_path / "shards"), "--sample-tokens", "-1"])
    assert "expected an integer >= 0, got -1" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer: x\noutput: y\nsources: []\nworkres: 2\n")
    assert main(["data", "prepare", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'workers'" in err and "bad.yaml" in err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["data", "train-tokenizer", str(tmp_path / "missing*.txt"), "--output", str(tmp_path / "t")]) == 2
    assert "no file matches" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config = PrepareConfig.load(path)
    assert config.sources and all(s.domain for s in config.sources)
