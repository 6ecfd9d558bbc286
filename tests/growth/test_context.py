"""`mamba-moe extend-context`: YaRN switched on (or off) in a trained checkpoint's config.json.

The output must load with from_pretrained and compute exactly what a model built directly with that
rope_scaling from the same weights computes (the reference here); the weights, the tokenizer and the source
are unchanged; the default original length is the longest seq_len along the checkpoint's lineage; every bad
input is an error naming its field that writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.numerics import rel_error
from helpers.training import save_tiny_checkpoint, tiny_config
from safetensors.torch import load_file

from mamba_moe.atomic import TMP_MARK
from mamba_moe.cli import main
from mamba_moe.config import MambaMoEConfig
from mamba_moe.data import load_tokenizer
from mamba_moe.growth import read_history
from mamba_moe.growth.common import GrowthError
from mamba_moe.growth.context import extend_context
from mamba_moe.model.lm import MambaMoEForCausalLM, load_state_dict_checked

YARN4_48 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 48, "beta_fast": 32.0,
            "beta_slow": 1.0}


def _checkpoint(corpus, path: Path, seq_len: int | None = 48, init_from: str | None = None,
                output: str | None = None, **overrides) -> Path:
    """A random tiny checkpoint with plain RoPE (unless overridden), the corpus tokenizer beside it, and, with
    ``seq_len``, the train_config.yaml a training run would have left in it."""
    save_tiny_checkpoint(corpus, path, **{"rope_scaling": None, **overrides})
    if seq_len is not None:
        changes = {"seq_len": seq_len, "init_from": init_from}
        tiny_config(corpus, Path(output or path), **changes).save(path / "train_config.yaml")
        (path / "trainer_state.pt").write_bytes(b"optimizer moments")  # training-only: must not be carried
    return path


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _logits(model: MambaMoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_yarn_on_equals_a_model_built_with_it_and_off_restores_the_source(corpus, tmp_path, capsys):
    src = _checkpoint(corpus, tmp_path / "src")
    before = _digest(src)
    out = tmp_path / "yarn"
    assert main(["extend-context", str(src), "--yarn", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "48 tokens" in printed and "max_position_embeddings: 256 -> 192" in printed

    extended = MambaMoEForCausalLM.from_pretrained(out)
    assert extended.config.rope_scaling == YARN4_48 and extended.config.max_position_embeddings == 192
    # The reference: the source's config with that rope_scaling, built directly, holding the source's weights.
    plain_config = MambaMoEConfig.load(src / "config.json")
    reference = MambaMoEForCausalLM(plain_config.replace(rope_scaling=dict(YARN4_48), max_position_embeddings=192))
    load_state_dict_checked(reference, load_file(str(src / "model.safetensors")), "source weights")
    ids = torch.randint(0, 512, (2, 150))  # past the original 48 positions
    got = _logits(extended, ids)
    assert torch.equal(got, _logits(reference, ids))
    plain = _logits(MambaMoEForCausalLM.from_pretrained(src), ids)
    assert rel_error(got, plain) > 1e-3  # the scaling is in effect (YaRN's temperature alone moves every score)

    weights_src, weights_out = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert weights_src.keys() == weights_out.keys()
    assert all(torch.equal(weights_src[k], weights_out[k]) for k in weights_src)
    assert load_tokenizer(out).get_vocab() == load_tokenizer(src).get_vocab()
    assert load_tokenizer(out).chat_template == load_tokenizer(src).chat_template
    assert not (out / "trainer_state.pt").exists() and not (out / "train_config.yaml").exists()
    [entry] = read_history(out)
    assert entry["operation"] == "extend_context" and entry["arguments"] == {"yarn": 4.0, "original_length": 48}
    assert entry["function_preserving"] is False and entry["source"] == str(src.resolve())
    assert entry["config_changes"]["rope_scaling"] == [None, YARN4_48]
    assert _digest(src) == before  # the source is untouched

    assert main(["info", str(out)]) == 0
    assert "extend_context(yarn=4.0, original_length=48): not function-preserving" in capsys.readouterr().out
    assert main(["extend-context", str(out), "--show"]) == 0
    shown = capsys.readouterr().out
    assert "YaRN x4 over an original 48 positions" in shown and "switched on by extend-context" in shown

    off = tmp_path / "off"
    assert main(["extend-context", str(out), "--off", "-o", str(off)]) == 0
    assert "note:" not in capsys.readouterr().out  # it undoes extend-context's own step: nothing to warn about
    assert MambaMoEConfig.load(off / "config.json") == plain_config
    assert torch.equal(_logits(MambaMoEForCausalLM.from_pretrained(off), ids), plain)
    assert [h["arguments"] for h in read_history(off)] == [{"yarn": 4.0, "original_length": 48}, {"off": True}]
    # and on again: the lineage runs back through both growth.json steps to the source's train_config.yaml
    again = extend_context(off, tmp_path / "again", 2)
    assert MambaMoEConfig.load(again.output / "config.json").rope_scaling["original_max_position_embeddings"] == 48


def test_off_on_a_checkpoint_trained_with_yarn_warns(corpus, tmp_path, capsys):
    src = _checkpoint(corpus, tmp_path / "src", rope_scaling=dict(YARN4_48), max_position_embeddings=192)
    assert main(["extend-context", str(src), "--show"]) == 0
    assert "trained with this scaling on" in capsys.readouterr().out
    assert main(["extend-context", str(src), "--off", "-o", str(tmp_path / "off")]) == 0
    assert "note: this scaling was not switched on by extend-context" in capsys.readouterr().out
    config = MambaMoEConfig.load(tmp_path / "off" / "config.json")
    assert config.rope_scaling is None and config.max_position_embeddings == 48


def test_a_checkpoint_trained_after_the_switch_is_not_called_untrained(corpus, tmp_path, capsys):
    """A run trained from the switched-on checkpoint carries its growth.json on (the last step still the switch):
    its checkpoints were trained with YaRN on, so --show must say so and --off must warn, as for any checkpoint
    trained with a scaling."""
    from mamba_moe.training import Trainer

    src = _checkpoint(corpus, tmp_path / "src")
    extend_context(src, tmp_path / "yarn", 4)
    cfg = tiny_config(corpus, tmp_path / "run", init_from=str(tmp_path / "yarn"), seq_len=48, max_steps=1,
                      save_every=1, eval_every=1, sample_tokens=0)
    trained = Trainer(cfg, log=lambda s: None).setup().train().checkpoint
    assert read_history(trained)[-1]["operation"] == "extend_context"  # carried on by the trainer
    assert MambaMoEConfig.load(trained / "config.json").rope_scaling == YARN4_48
    capsys.readouterr()

    assert main(["extend-context", str(trained), "--show"]) == 0
    shown = capsys.readouterr().out
    assert "then trained with it on" in shown and "back to plain RoPE" not in shown
    assert main(["extend-context", str(trained), "--off", "-o", str(tmp_path / "off")]) == 0
    assert "note: extend-context switched this scaling on, then this checkpoint's training run trained with it" \
        in capsys.readouterr().out
    # the switched-on checkpoint itself is still the untrained case
    assert main(["extend-context", str(tmp_path / "yarn"), "--show"]) == 0
    assert "switched on by extend-context (growth.json); back to plain RoPE" in capsys.readouterr().out


def test_original_length_is_the_longest_seq_len_of_the_lineage(corpus, tmp_path, monkeypatch):
    """Run a (seq 48, from scratch) -> run b (seq 32, --checkpoint runs/a, a relative path) -> grown -> extended:
    48, found from another working directory (b's relative init_from is resolved where b was started);
    also for a QAT run's final-quantized (its train_config.yaml is the run folder's)."""
    project = tmp_path / "project"
    a = _checkpoint(corpus, project / "runs/a/checkpoints/step-000004", seq_len=48, output="runs/a")
    b = _checkpoint(corpus, project / "runs/b/checkpoints/step-000002", seq_len=32, init_from="runs/a",
                    output="runs/b")
    monkeypatch.chdir(tmp_path)  # not the directory the runs were started from
    assert main(["grow", str(b), "-o", str(tmp_path / "grown"), "--add-layers", "1", "--at", "0"]) == 0
    report = extend_context(tmp_path / "grown", tmp_path / "long", 4)
    assert "48 tokens (the longest seq_len of 2 training runs" in report.detail
    config = MambaMoEConfig.load(tmp_path / "long" / "config.json")
    assert config.rope_scaling["original_max_position_embeddings"] == 48 and config.max_position_embeddings == 192
    lengths = read_history(tmp_path / "long")[-1]["trained_lengths"]
    assert sorted(x["seq_len"] for x in lengths) == [32, 48]

    quantized = _checkpoint(corpus, project / "runs/q/final-quantized", seq_len=None)
    tiny_config(corpus, Path("runs/q"), seq_len=40, init_from="runs/a").save(project / "runs/q/train_config.yaml")
    report = extend_context(quantized, tmp_path / "q-long", 4)
    assert report.detail.startswith("original length 48: trained at 48 tokens")

    # a link that is gone: the length is unknown, so it must be given, and nothing is written until it is
    shutil.move(str(a.parent.parent), str(tmp_path / "moved"))
    with pytest.raises(GrowthError, match=r"original_length: .*started from runs/a, which cannot be read now.*"
                                          r"give it with --original-length"):
        extend_context(tmp_path / "grown", tmp_path / "gap", 4)
    assert not (tmp_path / "gap").exists()
    assert extend_context(tmp_path / "grown", tmp_path / "gap", 4, original_length=64).detail.startswith(
        "original length 64: given")
    assert MambaMoEConfig.load(tmp_path / "gap" / "config.json").max_position_embeddings == 256


def _run(args: list[str], capsys) -> str:
    assert main(["extend-context", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_names_the_field_and_writes_nothing(corpus, tmp_path, capsys):
    src = _checkpoint(corpus, tmp_path / "src")
    before, names = _digest(src), sorted(os.listdir(src))
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    mamba = _checkpoint(corpus, tmp_path / "mamba", layer_mixers=["mamba"] * 4)
    scaled = _checkpoint(corpus, tmp_path / "scaled", rope_scaling=dict(YARN4_48), max_position_embeddings=192)
    unrecorded = _checkpoint(corpus, tmp_path / "unrecorded", seq_len=None)
    cases = [
        ([str(tmp_path / "nope"), "--yarn", "4", "-o", str(out)], "checkpoint: " + str(tmp_path / "nope")),
        ([str(tmp_path / "empty"), "--yarn", "4", "-o", str(out)], "not a checkpoint"),
        ([str(src), "--yarn", "1", "-o", str(out)], "yarn: the factor must be a finite number > 1 (got 1.0)"),
        ([str(src), "--yarn", "0.5", "-o", str(out)], "yarn: the factor must be a finite number > 1"),
        ([str(src), "--yarn", "nan", "-o", str(out)], "yarn: the factor must be a finite number > 1"),
        ([str(mamba), "--yarn", "4", "-o", str(out)], "has no attention layers"),
        ([str(mamba), "--off", "-o", str(out)], "has no attention layers"),
        ([str(scaled), "--yarn", "2", "-o", str(out)],
         "rope_scaling: " + str(scaled) + " already has YaRN x4 over an original 48 positions"),
        ([str(src), "--off", "-o", str(out)], "has plain RoPE (rope_theta 10000), max_position_embeddings 256 already"),
        ([str(src), "--yarn", "4", "-o", str(full)], f"output: {full} exists and is not empty"),
        ([str(src), "--yarn", "4", "-o", str(tmp_path / "a-file")], "exists and is not a directory"),
        ([str(src), "--yarn", "4", "-o", str(src)], "is the checkpoint itself"),
        ([str(src), "--yarn", "4", "-o", str(tmp_path), "--overwrite"], "contains the checkpoint"),
        ([str(src), "--yarn", "4", "-o", str(src / "yarn")], "is inside the checkpoint"),
        ([str(src), "--yarn", "4", "--original-length", "300", "-o", str(out)],
         "original_length: 300 exceeds the checkpoint's max_position_embeddings (256)"),
        ([str(unrecorded), "--yarn", "4", "-o", str(out)], "neither train_config.yaml nor growth.json"),
        ([str(src), "--yarn", "4"], "output: --yarn writes a new checkpoint; give its directory with -o OUT"),
        ([str(src), "--show", "-o", str(out)], "output: --show writes nothing"),
        ([str(src), "--off", "--original-length", "8", "-o", str(out)], "original_length: --original-length goes "
                                                                         "with --yarn"),
    ]
    for args, needle in cases:
        err = _run(args, capsys)
        assert needle in err, (args, err)
        assert not out.exists(), args
    assert (full / "keep.txt").read_text() == "keep" and (tmp_path / "a-file").read_text() == "x"
    assert _digest(src) == before and sorted(os.listdir(src)) == names
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]

    # an empty directory is a fine output; --overwrite replaces a non-empty one whole
    assert main(["extend-context", str(src), "--yarn", "4", "-o", str(tmp_path / "empty")]) == 0
    assert main(["extend-context", str(src), "--yarn", "2", "-o", str(full), "--overwrite"]) == 0
    assert not (full / "keep.txt").exists() and MambaMoEConfig.load(full).max_position_embeddings == 96
    assert main(["extend-context", str(unrecorded), "--yarn", "4", "--original-length", "64", "-o", str(out)]) == 0


def test_a_failed_write_leaves_no_output(corpus, tmp_path, monkeypatch):
    src = _checkpoint(corpus, tmp_path / "src")
    import mamba_moe.growth.context as context

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(context, "write_history", broken)
    with pytest.raises(OSError, match="disk full"):
        extend_context(src, tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]
