"""Stages: shipped configs, `--checkpoint DIR` (weights from a previous stage, fresh optimizer), SFT on chats,
plain RoPE through the stages and YaRN switched on after the last one (`mamba-moe extend-context`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.training import chat_file
from safetensors.torch import load_file

from mamba_moe.cli import main
from mamba_moe.config import ConfigError, MambaMoEConfig
from mamba_moe.data import SFTDataset, load_tokenizer
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.training import TrainConfig, Trainer

STAGES = ["stage1_pretrain", "stage2_instruction", "stage3_reasoning", "stage4_memory", "stage5_qat"]


STAGE1_SEQ_LEN = 192  # longer than stage 2's rows (160): the trained length of what follows is stage 1's


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory) -> Path:
    """A 2-step run of the shipped tiny stage-1 config on the test corpus (its output folder)."""
    tok, shards = corpus
    out = tmp_path_factory.mktemp("stage1") / "run"
    torch.set_num_threads(1)
    cfg = TrainConfig.load("configs/train/tiny/stage1_pretrain.yaml", [
        "data.source=shards", f"data.path={shards}", f"data.tokenizer={tok}", f"output={out}", "max_steps=2",
        "save_every=2", "eval_every=2", "eval_batches=2", "batch_size=2", f"seq_len={STAGE1_SEQ_LEN}",
        "progress=false"])
    Trainer(cfg).setup().train()
    return out


def test_shipped_stage_configs_load() -> None:
    for name in STAGES:
        big = TrainConfig.load(f"configs/train/{name}.yaml")
        tiny = TrainConfig.load(f"configs/train/tiny/{name}.yaml")
        assert big.model.build().d_model == 1024, name
        assert (big.data.source == "chat") == (name != "stage1_pretrain") == (tiny.data.source == "chat"), name
        assert not big.data.pack and not tiny.data.pack, name  # one chat per row (docs/training.md)
        assert (big.qat is not None) == (tiny.qat is not None) == (name == "stage5_qat"), name
    assert TrainConfig.load("configs/train/stage5_qat.yaml").qat.group_size == 32
    assert TrainConfig.load("configs/train/tiny/stage4_memory.yaml").activation_checkpointing
    # Plain RoPE from stage 1 (YaRN goes on after the last stage), with room for the longest rows of any stage;
    # stages 2-5 take the model from stage 1's checkpoint and say nothing about it that would be ignored.
    for prefix in ("configs/train/", "configs/train/tiny/"):
        first = TrainConfig.load(f"{prefix}stage1_pretrain.yaml").model.build()
        longest = max(TrainConfig.load(f"{prefix}{name}.yaml").seq_len for name in STAGES)
        assert first.rope_scaling is None and first.max_position_embeddings == longest, prefix
        for name in STAGES[1:]:
            later = TrainConfig.load(f"{prefix}{name}.yaml")
            assert not later.model.overrides and not later.model.config and later.init_from is None, (prefix, name)


@pytest.fixture(scope="module")
def explain(tmp_path_factory) -> Path:
    return chat_file(tmp_path_factory.mktemp("chats") / "explain.jsonl", "explain", 48)


def _stage2(chats: Path, tmp_path: Path, init: Path, **changes) -> TrainConfig:
    overrides = [f"data.path={chats}", f"output={tmp_path / 'stage2'}", f"init_from={init}", "max_steps=3",
                 "eval_every=3", "save_every=3", "batch_size=4", "progress=false", "eval_batches=2",
                 "data.val_fraction=0.25"]
    overrides += [f"{k}={v}" for k, v in changes.items()]
    return TrainConfig.load("configs/train/tiny/stage2_instruction.yaml", overrides)


def test_checkpoint_starts_a_stage_from_previous_weights(explain, stage1, tmp_path) -> None:
    init = stage1 / "checkpoints" / "step-000002"
    trainer = Trainer(_stage2(explain, tmp_path, stage1)).setup()  # a run folder: its newest checkpoint
    assert trainer.init_dir == init
    before = load_file(str(init / "model.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.step == 0 and not trainer.optimizer.state  # fresh optimizer, schedule and step
    assert trainer.model.config == MambaMoEForCausalLM.from_pretrained(init).config

    # SFT batches: targets only on assistant tokens, padding masked, one chat per row
    batch = trainer.data.next()
    tok = trainer.tokenizer
    ds = trainer.data.train_ds
    assert batch.attention_mask is not None and batch.document_ids is None
    for row in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :n].tolist()
        match = [i for i in range(len(ds)) if ds.ids[i][:n].tolist() == ids]
        assert match, "row is one whole chat from its start"
        mask = ds.masks[match[0]]
        trained = (batch.targets[row] != -100).nonzero().flatten().tolist()
        assert trained == [t for t in range(len(mask) - 1) if mask[t + 1]]
        assert tok.decode(batch.targets[row][batch.targets[row] != -100].tolist()).strip()

    result = trainer.train()
    assert len(result.losses) == 3 and all(x == x for x in result.losses)
    assert result.val and result.val["val_loss"] > 0
    assert MambaMoEForCausalLM.from_pretrained(result.checkpoint).config.d_model == trainer.model.config.d_model
    assert load_tokenizer(result.checkpoint).get_vocab() == tok.get_vocab()


def test_checkpoint_cli_and_bad_directories(explain, stage1, tmp_path, capsys) -> None:
    cfg = _stage2(explain, tmp_path, stage1, max_steps=1, eval_every=1, save_every=1, sample_tokens=4)
    cfg.init_from = None
    path = tmp_path / "s2.yaml"
    cfg.save(path)
    assert main(["train", "--config", str(path), "--checkpoint", str(stage1)]) == 0
    out = capsys.readouterr().out
    assert "weights from" in out and "step-000002" in out and "train chats" in out
    assert "unigram entropy" in out and "<|im_start|>assistant" in out

    (tmp_path / "empty").mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    for bad, needle in ((tmp_path / "nope", "no such directory"), (tmp_path / "empty", "not a checkpoint"),
                        (half, "missing model.safetensors"), (path, "not a directory")):
        assert main(["train", "--config", str(path), "--checkpoint", str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(bad) in err, err
    with pytest.raises(ConfigError, match="chat data needs a tokenizer"):
        Trainer(cfg).setup()


def test_generated_chats(corpus, tmp_path) -> None:
    """The tiny stages' data: recall answers repeat a first-turn fact; every chat encodes with trained tokens."""
    from mamba_moe.training.chatgen import reasoning_chats, recall_chats

    for chat in recall_chats(30, seed=3):
        first, last = chat["messages"][0]["content"], chat["messages"][-1]["content"]
        fact = last.rstrip(".").split()[-1]
        assert fact in first and len(chat["messages"]) >= 6
    for chat in reasoning_chats(30, seed=4):
        q, a = chat["messages"][0]["content"], chat["messages"][1]["content"]
        x, op, y = q.removeprefix("What is ").rstrip("?").split()
        assert a.endswith(f"= {eval(f'{int(x)} {op} {int(y)}')}.")  # noqa: S307 - generated arithmetic
    tok = load_tokenizer(corpus[0])
    lines = chat_file(tmp_path / "r.jsonl", "recall", 5).read_text().splitlines()
    ds = SFTDataset([json.loads(x)["messages"] for x in lines], tok, 400)
    assert len(ds) == 5 and all(m.sum() > 0 for m in ds.masks)


def test_packed_chats_are_computed_as_if_alone(explain, stage1, tmp_path) -> None:
    """data.pack=true: several chats per row, with document ids so each is computed as if alone."""
    from helpers.numerics import rel_error

    trainer = Trainer(_stage2(explain, tmp_path, stage1, **{"data.pack": "true", "seq_len": 256, "max_steps": 1,
                                                             "eval_every": 1, "save_every": 1})).setup()
    batch = trainer.data.next()
    docs, mask = batch.document_ids[0], batch.attention_mask[0]
    assert int(docs[mask].max()) >= 1, "the row holds several chats"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(batch.input_ids[:1], attention_mask=batch.attention_mask[:1],
                       document_ids=batch.document_ids[:1]).logits[0]
        for d in docs[mask].unique().tolist():
            idx = ((docs == d) & mask).nonzero().flatten()
            alone = model(batch.input_ids[0, idx][None]).logits[0]
            assert rel_error(packed[idx], alone) < 1e-4, d
    model.train()
    assert all(x == x for x in trainer.train().losses)


def test_stages_train_plain_rope_and_yarn_is_switched_on_after(explain, stage1, tmp_path, capsys) -> None:
    """The documented pipeline in small: stage 1 trains plain RoPE, stage 2 inherits the model from the checkpoint
    (the preset's YaRN does not come back), and extend-context after the last stage switches YaRN on over the
    longest seq_len trained (stage 1's, found through stage 2's init_from), weights untouched."""
    first = MambaMoEConfig.load(stage1 / "checkpoints" / "step-000002" / "config.json")
    assert first.rope_scaling is None and first.max_position_embeddings == 384
    trainer = Trainer(_stage2(explain, tmp_path, stage1, max_steps=1, eval_every=1, save_every=1)).setup()
    assert trainer.model.config == first
    last = trainer.train().checkpoint

    assert main(["extend-context", str(tmp_path / "stage2"), "--show"]) == 0  # a run folder: its newest checkpoint
    assert f"trained at: {STAGE1_SEQ_LEN} tokens (the longest seq_len of 2 training runs" in capsys.readouterr().out
    out = tmp_path / "final-yarn4"
    assert main(["extend-context", str(tmp_path / "stage2"), "--yarn", "4", "-o", str(out)]) == 0
    config = MambaMoEConfig.load(out / "config.json")
    assert config.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": STAGE1_SEQ_LEN,
                                   "beta_fast": 32.0, "beta_slow": 1.0}
    assert config.max_position_embeddings == 4 * STAGE1_SEQ_LEN
    assert config.replace(rope_scaling=None, max_position_embeddings=384) == first
    assert (out / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
    assert load_tokenizer(out).get_vocab() == trainer.tokenizer.get_vocab()
    model = MambaMoEForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 2 * STAGE1_SEQ_LEN))).logits).all()
