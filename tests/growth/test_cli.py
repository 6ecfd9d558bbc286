"""`mamba-moe grow` end to end: each operation writes a normal checkpoint (loads with from_pretrained, keeps
the logits, carries the tokenizer and its growth history) that the project's trainer trains; bad input
names the field and leaves no output behind."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.numerics import rel_error
from helpers.training import save_tiny_checkpoint, tiny_config

from mamba_moe.cli import main
from mamba_moe.growth import HISTORY_NAME, format_history, read_history
from mamba_moe.model.lm import MambaMoEForCausalLM
from mamba_moe.training import Trainer


def _checkpoint(corpus, path, **overrides):
    """A random tiny checkpoint (vocab of the tiny corpus) with the corpus tokenizer beside it."""
    return save_tiny_checkpoint(corpus, path, **overrides)


def _logits(path, ids):
    model = MambaMoEForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


def _train_one_step(corpus, checkpoint, out):
    trainer = Trainer(tiny_config(corpus, out, init_from=str(checkpoint), max_steps=1, save_every=1,
                                  eval_every=1)).setup()
    try:
        rec = trainer.train_step()
    finally:
        trainer.close()
    assert rec["finite"] and rec["loss"] > 0
    return trainer, rec


OPERATIONS = {
    "add_experts": (["--add-experts", "4", "--domain", "code"], {}),
    "add_layers": (["--add-layers", "1", "--at", "2", "--mixer", "attention", "--ffn", "dense"], {}),
    "dense_to_moe": (["--dense-to-moe", "2", "--moe-router", "topk:1"],
                     {"layer_ffns": ["dense", "none", "dense", "moe"], "moe_num_experts": 2,
                      "moe_expert_hidden_size": 48, "ffn_hidden_size": 48, "moe_router": "topk"}),
    "router": (["--router", "topk:2", "--eval", "SHARDS", "--seq-len", "32", "--eval-windows", "4"], {}),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_grow_writes_a_trainable_checkpoint(corpus, tmp_path, operation, capsys):
    flags, overrides = OPERATIONS[operation]
    flags = [str(corpus[1]) if f == "SHARDS" else f for f in flags]
    src = _checkpoint(corpus, tmp_path / "src", **overrides)
    out = tmp_path / "grown"
    assert main(["grow", str(src), "-o", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", HISTORY_NAME):
        assert (out / name).is_file(), name
    history = read_history(out)
    assert [h["operation"] for h in history] == [operation]
    ids = torch.randint(0, 512, (2, 24))
    if operation == "router":
        assert "NOT function-preserving" in printed and "held-out loss" in printed
        assert history[0]["function_preserving"] is False and history[0]["heldout"]["windows"] == 4
    else:
        assert history[0]["function_preserving"] is True
        assert history[0]["check"]["max_rel_error"] < 1e-5
        assert rel_error(_logits(out, ids), _logits(src, ids)) < 1e-5
    if operation == "add_experts":
        assert history[0]["domain_experts"] == {"code": 4}
        assert "domain_routing" in printed
    print(format_history(history))
    _train_one_step(corpus, out, tmp_path / "run")

    again = tmp_path / "twice"  # a grown checkpoint grows again; the history accumulates
    assert main(["grow", str(out), "-o", str(again), "--add-layers", "1", "--at", "0"]) == 0
    assert [h["operation"] for h in read_history(again)] == [operation, "add_layers"]


def test_training_after_add_experts_routes_to_the_new_experts(corpus, tmp_path):
    src = _checkpoint(corpus, tmp_path / "src")
    out = tmp_path / "grown"
    assert main(["grow", str(src), "-o", str(out), "--add-experts", "4"]) == 0
    # 24 steps of 256 tokens, not 6 of 64: from some random initialisations (test seeds 64, 81) the short run's
    # loss was still noise around ln(vocab) and the held-out loss did not fall; this one fell for seeds 40-100
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", init_from=str(out), max_steps=24, save_every=24,
                                  eval_every=24, batch_size=8, lr=3e-3)).setup()
    before = trainer.evaluate()["val_loss"]
    result = trainer.train()
    assert result.val["val_loss"] < before
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    load = rows[-1]["expert_load"]
    assert len(load) == 8 and sum(load[4:]) > 0.05, load          # the copies receive tokens (argmax share)
    grown = MambaMoEForCausalLM.from_pretrained(result.checkpoint)
    moved = grown.backbone.layers[0].ffn.experts.down_proj.detach()
    first = MambaMoEForCausalLM.from_pretrained(out).backbone.layers[0].ffn.experts.down_proj.detach()
    assert float((moved[4:] - first[4:]).abs().max()) > 0           # the new experts were trained


def test_bad_input_names_the_field_and_writes_nothing(corpus, tmp_path, capsys):
    src = _checkpoint(corpus, tmp_path / "src")
    out = tmp_path / "out"
    cases = [
        (["--add-experts", "3"], "add_experts: 3 new experts"),
        (["--add-layers", "1", "--at", "9"], "at: layer index 9 out of range"),
        (["--add-layers", "1"], "at: --add-layers needs --at"),
        (["--add-experts", "4", "--at", "1"], "at: --at does not apply to --add-experts"),
        (["--router", "topk:2"], "eval: --router changes the model's output"),
        (["--dense-to-moe", "4"], "layer_ffns: no dense FFN to upcycle"),
        (["--add-layers", "1", "--at", "0", "--domain", "x"], "domain: a domain label"),
    ]
    for flags, message in cases:
        assert main(["grow", str(src), "-o", str(out), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not out.exists()
    assert main(["grow", str(tmp_path / "nowhere"), "-o", str(out), "--add-experts", "4"]) == 2
    assert "checkpoint: " in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["grow", str(src), "-o", str(out), "--add-experts", "4"]) == 2
    assert "output: " in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["grow", str(src), "-o", str(src), "--add-experts", "4", "--overwrite"]) == 2
    assert "is an input" in capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


TRAINED = {
    "add_experts": (["--add-experts", "4"], {}),
    "add_layers": (["--add-layers", "2", "--at", "1", "--mixer", "attention"], {}),
    "dense_to_moe": (["--dense-to-moe", "4"], {"layer_ffns": ["dense", "moe", "none", "dense"], "ffn_hidden_size": 64,
                                               "moe_expert_hidden_size": 64}),
}


@pytest.mark.parametrize("operation", list(TRAINED))
def test_grow_a_trained_run(corpus, tmp_path, operation):
    """A model the trainer moved (not a random one) grows with its logits unchanged; the run folder itself
    names its newest checkpoint."""
    flags, overrides = TRAINED[operation]
    model = {"preset": "mamba-moe-tiny", "overrides": {"vocab_size": 512, **overrides}}
    Trainer(tiny_config(corpus, tmp_path / "run", model=model, max_steps=4, save_every=4, eval_every=4)).setup().train()
    out = tmp_path / "grown"
    assert main(["grow", str(tmp_path / "run"), "-o", str(out), *flags]) == 0
    ids = torch.randint(0, 512, (2, 24))
    source = read_history(out)[0]["source"]
    assert source.endswith("step-000004")
    assert rel_error(_logits(out, ids), _logits(source, ids)) < 1e-5
