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
    # 16 query heads after the export's diff2 fold over one K/V head: what keeps llama.cpp's decode at 8k
    # context above 39 tok/s on 2 CPU cores (docs/benchmarks.md); 32 query heads fell below it
    assert (2 * c.attn_num_heads, c.attn_num_kv_heads) == (16, 1)
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
    with pytest.raises(ConfigError, match="typo.yaml: num_layers: unknown key"):
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
    from helpers.toy import save_toy_checkpoint
    from transformers import AutoTokenizer

    path = save_toy_checkpoint(tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"


# ---- types named by field (validation.py): each of these used to escape as a TypeError/ValueError -----------

@pytest.mark.parametrize("changes, message", [
    ({"rms_norm_eps": "abc"}, "rms_norm_eps: expected a number, got 'abc'"),
    ({"d_model": 64.0}, "d_model: must be a positive integer"),
    ({"n_layers": True}, "n_layers: must be a positive integer"),
    ({"layer_mixers": 5}, "layer_mixers: must be a list"),
    ({"layer_ffns": None, "n_layers": "4"}, "n_layers: must be a positive integer"),
    ({"rope_scaling": 5}, "rope_scaling: expected a mapping"),
    ({"rope_scaling": {"type": "yarn", "factor": "big", "original_max_position_embeddings": 64}},
     "rope_scaling.factor: expected a number"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 6.5}},
     "rope_scaling.original_max_position_embeddings: must be a positive integer"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings: must be true or false"),
    ({"rope_theta": float("inf")}, "rope_theta: must be a finite number > 0"),
    ({"moe_aux_loss_coef": float("nan")}, "moe_aux_loss_coef: must be a finite number >= 0"),
    ({"ssm_dt_min": 0.5}, "ssm_dt_min: exceeds ssm_dt_max"),
    ({"eos_token_id": -1}, "eos_token_id: must be a non-negative integer or null"),
    ({"attn_type": ["gqa"]}, r"attn_type: \['gqa'\] is not one of"),
    ({"layer_mixers": ["mamba", "attention", "mamba", "atention"]}, r"layer_mixers\[3\]: 'atention'"),
])
def test_wrong_types_are_config_errors_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("mamba-moe-tiny", **changes)


def test_yaml_numbers_without_a_dot_still_load(tmp_path):
    """YAML 1.1 reads 1e-5 as a string; float fields accept it (checked strictly after conversion)."""
    (tmp_path / "m.yaml").write_text("preset: mamba-moe-tiny\nrms_norm_eps: 1e-5\nrope_theta: 1e6\n")
    c = MambaMoEConfig.load(tmp_path / "m.yaml")
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 1e6


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: config file not found"):
        MambaMoEConfig.load(tmp_path)  # a directory without config.json
    (tmp_path / "bad.yaml").write_bytes(b"d_model: \xff\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid UTF-8 at byte 9"):
        MambaMoEConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: config: expected a mapping, got list"):
        MambaMoEConfig.load(tmp_path / "list.yaml")
    (tmp_path / "p.yaml").write_text("preset: 5\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: preset: unknown preset 5"):
        MambaMoEConfig.load(tmp_path / "p.yaml")


def test_one_config_error_family():
    from mamba_moe import config as model_config
    from mamba_moe import validation
    from mamba_moe.data.config import DataError
    from mamba_moe.data.shards import TokenizerMismatchError

    assert model_config.ConfigError is validation.ConfigError
    assert issubclass(DataError, validation.ConfigError) and issubclass(validation.ConfigError, ValueError)
    assert issubclass(TokenizerMismatchError, validation.ConfigError)


def test_validation_helpers_word_every_error_the_same_way():
    from dataclasses import dataclass

    from mamba_moe import validation as v

    assert v.field_path("", "lr") == "lr" and v.field_path("data.", "path") == "data.path"
    assert v.field_path("sources", 2) == "sources[2]"
    assert str(v.unknown_key("wieght", ["weight", "name"], "sources[0]")) == (
        "sources[0].wieght: unknown key; did you mean 'weight'?")
    assert str(v.unknown_key("zzz", ["a"], "", list_known=True)) == "zzz: unknown key (known: a)"
    with pytest.raises(ConfigError, match=r"^schedule: 'cosin' is not one of \['cosine', 'wsd'\]; did you mean"):
        v.check_choice("schedule", "cosin", ("cosine", "wsd"))
    with pytest.raises(ConfigError, match=r"x: \{\} is not one of"):
        v.check_choice("x", {}, ("a",))  # unhashable: reported, not a TypeError
    assert v.check_number("lr", 3) == 3.0 and v.check_number("lr", None, optional=True) is None
    for bad in (float("inf"), float("nan"), True, "1", -1.0):
        with pytest.raises(ConfigError, match=r"^lr: must be a finite number >= 0 \(got"):
            v.check_number("lr", bad, minimum=0)
    with pytest.raises(ConfigError, match=r"f: must be a finite number > 0 and < 1"):
        v.check_number("f", 1, minimum=0, maximum=1, min_open=True, max_open=True)
    for bad in (1.5, True, "3", 0):
        with pytest.raises(ConfigError, match=r"^seed: must be a positive integer"):
            v.check_int("seed", bad, minimum=1)
    with pytest.raises(ConfigError, match=r"k: must be an integer >= 2 and <= 8"):
        v.check_int("k", 9, minimum=2, maximum=8)
    assert v.check_str_list("paths", "a") == ["a"]
    with pytest.raises(ConfigError, match="paths: must be a list of strings"):
        v.check_str_list("paths", [1])
    assert v.coerce_float("lr", "3e-4") == 3e-4 and v.coerce_float("lr", 1) == 1
    with pytest.raises(ConfigError, match="lr: expected a number, got 'fast'"):
        v.coerce_float("lr", "fast")

    @dataclass
    class Spec:
        name: str
        rate: float = 0.1
        count: int = 1

        def __post_init__(self):
            v.check_int("spec.count", self.count, minimum=1)

    assert v.build_dataclass(Spec, {"name": "a", "rate": "1e-3"}, "spec") == Spec("a", 1e-3)
    with pytest.raises(ConfigError, match="spec: missing required key"):
        v.build_dataclass(Spec, {}, "spec")
    with pytest.raises(ConfigError, match="spec.rat: unknown key; did you mean 'rate'"):
        v.build_dataclass(Spec, {"name": "a", "rat": 1}, "spec")
    with pytest.raises(ConfigError, match="spec.count: must be a positive integer"):
        v.build_dataclass(Spec, {"name": "a", "count": "2"}, "spec")
    with pytest.raises(ConfigError, match="spec: expected a mapping, got list"):
        v.build_dataclass(Spec, [], "spec")
