"""Config: presets, YAML/JSON round trips, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from mamba_moe.config import PRESETS, ConfigError, MambaMoEConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml_and_json(name, tmp_path):
    config = get_preset(name)
    for file in ("c.yaml", "config.json"):
        config.save(tmp_path / file)
        assert MambaMoEConfig.load(tmp_path / file) == config


def test_mamba_r1_preset_is_seed_004s_specification():
    c = get_preset("mamba-r1")
    assert (c.d_model, c.n_layers, c.ssm_state_size, c.ssm_conv_kernel, c.ssm_expand, c.moe_num_experts,
            c.moe_expert_hidden_size, c.max_position_embeddings) == (512, 12, 64, 4, 2, 8, 2048, 2048)
    assert c.moe_router == "switch" and c.ffn_activation == "gelu"
    assert c.layer_mixers == ["mamba"] * 12 and c.layer_ffns == ["moe"] * 12


def test_flagship_layout():
    c = get_preset("mamba-moe-300m")
    assert (c.n_layers, c.d_model, c.vocab_size) == (24, 1024, 32000)
    assert c.layer_mixers.count("attention") == 4 and c.layer_ffns == ["moe"] * 24
    assert c.attn_type == "diff2" and c.diff2_lambda == "head" and c.moe_router == "soft"
    assert 4 <= c.moe_num_experts <= 6 and c.moe_shared_expert_hidden_size > 0
    assert c.rope_scaling["type"] == "yarn" and c.rope_scaling["original_max_position_embeddings"] == 8192


def test_yaml_can_start_from_a_preset(tmp_path):
    (tmp_path / "m.yaml").write_text("preset: mamba-moe-tiny\nn_layers: 2\nlayer_mixers: [mamba, attention]\n"
                                     "layer_ffns: [dense, moe]\n")
    c = MambaMoEConfig.load(tmp_path / "m.yaml")
    assert c.n_layers == 2 and c.layer_ffns == ["dense", "moe"] and c.d_model == 64


@pytest.mark.parametrize("changes, field", [
    ({"d_modle": 64}, "did you mean 'd_model'"),
    ({"moe_top_k": 5, "moe_router": "topk"}, "moe_num_experts"),
    ({"attn_head_dim": None, "attn_num_heads": 5}, "attn_num_heads"),
    ({"attn_num_kv_heads": 3}, "attn_num_kv_heads"),
    ({"ssm_head_dim": 48}, "ssm_head_dim"),
    ({"ssm_ngroups": 3}, "ssm_ngroups"),
    ({"layer_mixers": ["mamba", "atention", "mamba", "mamba"]}, "did you mean 'attention'"),
    ({"layer_ffns": ["moe"]}, "layer_ffns: needs one entry per layer"),
    ({"moe_router": "soft_moe"}, "moe_router"),
    ({"d_model": 0}, "d_model: must be a positive integer"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embedings": 64}},
     "did you mean 'original_max_position_embeddings'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "original_max_position_embeddings": 64}},
     "rope_scaling.type"),
    ({"embedding_rank": 64}, "embedding_rank"),
])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("mamba-moe-tiny", **changes)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'mamba-moe-300m'"):
        get_preset("mamba-moe-300")
    (tmp_path / "broken.yaml").write_text("d_model: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        MambaMoEConfig.load(tmp_path / "broken.yaml")
    (tmp_path / "typo.yaml").write_text("preset: mamba-moe-tiny\nnum_layers: 3\n")
    with pytest.raises(ConfigError, match="typo.yaml: num_layers: unknown config key"):
        MambaMoEConfig.load(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="not found"):
        MambaMoEConfig.load(tmp_path / "absent.json")


@pytest.mark.parametrize("preset", ["mamba-moe-tiny", "mamba-r1"])
def test_config_json_round_trip_uses_rope_parameters(tmp_path, preset):
    cfg = get_preset(preset)
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in data and data["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert MambaMoEConfig.load(tmp_path / "config.json") == cfg


def test_legacy_rope_scaling_in_config_json_still_loads(tmp_path):
    cfg = get_preset("mamba-moe-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba_moe", **cfg.to_dict()}))
    assert MambaMoEConfig.load(tmp_path) == cfg


def test_auto_tokenizer_reads_a_checkpoint_directory(tmp_path):
    """Generic tools (lm-eval, transformers pipelines) parse config.json without knowing our model type."""
    from transformers import AutoTokenizer

    from mamba_moe.inference.toy import save_toy_checkpoint

    path = save_toy_checkpoint(tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"
