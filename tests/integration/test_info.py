"""`mamba-moe info`: the export tiers of a config (features that block a runtime, by rule name; caveats) and of a
checkpoint (also which GGUF file types its tensors fit), as the export package's own checks decide them."""

from __future__ import annotations

from helpers.toy import save_toy_checkpoint

from mamba_moe.cli import main
from mamba_moe.config import MambaMoEConfig, get_preset
from mamba_moe.export import export_blockers, export_caveats
from mamba_moe.export.hf_export import hf_blockers


def _info(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["info", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_blocked_features_are_named_per_runtime(tmp_path, capsys):
    config = get_preset("mamba-moe-tiny", moe_router="switch", attn_type="diff")
    path = tmp_path / "blocked.json"
    config.save(path)
    out = _info(capsys, "--config", path)
    gguf, hf = out.split("  llama.cpp GGUF")[1].split("  transformers")
    for blocker in export_blockers(config):
        assert f"refused by {blocker}" in gguf
    for blocker in hf_blockers(config):
        assert f"refused by {blocker}" in hf
    assert {b.rule for b in export_blockers(config)} >= {"moe_router", "attn_type"}
    assert ": refused (" in gguf and "GraniteMoeHybridForCausalLM): refused" in hf


def test_checkpoint_tiers_name_the_file_types_that_fit(tmp_path, capsys):
    ckpt = save_toy_checkpoint(tmp_path / "toy", seed=3)
    out = _info(capsys, ckpt)
    assert f"checkpoint: {ckpt}" in out and "growth history: none" in out
    config = MambaMoEConfig.load(ckpt / "config.json")
    assert config.d_model % 256                                          # the tiny preset: no K-quants
    line = next(x for x in out.splitlines() if x.strip().startswith("file types:"))
    assert "f32, f16, bf16, q8_0, q4_0 fit" in line and "q4_k_m, q5_k_m, q6_k refused: " in line
    assert "not a multiple of 256" in line
    for caveat in export_caveats(config):
        assert f"caveat {caveat}" in out
    assert "mamba-moe export hf`): exports" in out


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    ckpt = save_toy_checkpoint(tmp_path / "toy", seed=3)
    assert main(["info", str(ckpt), "--config", str(ckpt / "config.json")]) == 2
    assert "--config: give a checkpoint or a model config, not both" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such directory" in capsys.readouterr().err
