"""Rules that decide whether a config can be exported to llama.cpp's granitehybrid GGUF architecture."""

from __future__ import annotations

import pytest

from mamba_moe.config import MambaMoEConfig, get_preset
from mamba_moe.export import CAVEATS, RULES, ExportBlocker, check_exportable, export_blockers, export_caveats

FLAGSHIP = get_preset("mamba-moe-300m")
YARN = FLAGSHIP.rope_scaling


def rules(config: MambaMoEConfig) -> list[str]:
    return [b.rule for b in export_blockers(config)]


def test_flagship_is_exportable():
    assert export_blockers(FLAGSHIP) == []
    check_exportable(FLAGSHIP)  # does not raise


# Each change breaks exactly one rule of the flagship.
BROKEN = {
    "ssm_expand": dict(ssm_expand=4),
    "ssm_ngroups": dict(ssm_ngroups=4),
    "attention_layer": dict(layer_mixers=["mamba"] * 24),
    "ffn_uniform/dense": dict(layer_ffns=["moe"] * 23 + ["dense"]),
    "ffn_uniform/none": dict(layer_ffns=["none"] + ["moe"] * 23),
    "ffn_activation": dict(ffn_activation="gelu"),
    "moe_router": dict(moe_router="switch"),
    "attn_type": dict(attn_type="diff"),
    "diff2_lambda": dict(diff2_lambda="token"),
    "rope_scaling/beta_fast": dict(rope_scaling={**YARN, "beta_fast": 16.0}),
    "rope_scaling/beta_slow": dict(rope_scaling={**YARN, "beta_slow": 2.0}),
    "rope_scaling/attention_factor": dict(rope_scaling={**YARN, "attention_factor": 1.0}),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_rule_fires_alone(case):
    rule, _, field = case.partition("/")
    blockers = export_blockers(FLAGSHIP.replace(**BROKEN[case]))
    assert [b.rule for b in blockers] == [rule]


def test_every_rule_is_tested():
    assert {case.partition("/")[0] for case in BROKEN} == set(RULES)


def test_rules_that_do_not_apply_are_skipped():
    # Without attention layers the attention rules do not apply; without MoE layers the router and
    # expert sizes do not matter; without Mamba layers the SSM shape does not.
    # (A model without attention layers is itself blocked, by attention_layer alone.)
    no_attn = FLAGSHIP.replace(layer_mixers=["mamba"] * 24, attn_type="diff",
                               rope_scaling={**YARN, "beta_fast": 8.0})
    assert rules(no_attn) == ["attention_layer"]
    dense = FLAGSHIP.replace(layer_ffns=["dense"] * 24, moe_router="switch", moe_expert_hidden_size=100)
    assert rules(dense) == []
    no_mamba = FLAGSHIP.replace(layer_mixers=["attention"] * 24, ssm_state_size=16, ssm_expand=3)
    assert rules(no_mamba) == []
    assert rules(FLAGSHIP.replace(rope_scaling=None)) == []
    topk = FLAGSHIP.replace(moe_router="topk", moe_top_k=2)
    assert rules(topk) == []


def test_mamba_r1_preset():
    # Seed 004: d_state 64, GELU experts behind a Switch router; 512 / 2048 are multiples of 256.
    # (and no attention layer)
    assert rules(get_preset("mamba-r1")) == ["attention_layer", "ffn_activation", "moe_router"]
    assert [c.rule for c in export_caveats(get_preset("mamba-r1"))] == ["ssm_state_size"]


def test_several_blockers_are_all_reported():
    config = FLAGSHIP.replace(ssm_expand=4, moe_router="switch", attn_type="diff")
    assert rules(config) == ["ssm_expand", "moe_router", "attn_type"]


def test_check_exportable_lists_every_rule():
    with pytest.raises(ValueError) as err:
        check_exportable(get_preset("mamba-r1"))
    for rule in ("attention_layer", "ffn_activation", "moe_router"):
        assert f"{rule}:" in str(err.value)


# Each change costs the flagship exactly one caveat (and blocks nothing): the field named in the message.
CAVEAT_CASES = {
    "hidden_multiple_256/d_model": dict(d_model=1152),
    "hidden_multiple_256/ffn_hidden_size": dict(layer_ffns=["dense"] * 24, ffn_hidden_size=2800),
    "hidden_multiple_256/moe_expert_hidden_size": dict(moe_expert_hidden_size=384),
    "hidden_multiple_256/moe_shared_expert_hidden_size": dict(moe_shared_expert_hidden_size=320),
    "ssm_state_size/64": dict(ssm_state_size=64),
    "ssm_head_dim/field": dict(ssm_head_dim=128),
}


@pytest.mark.parametrize("case", sorted(CAVEAT_CASES))
def test_each_caveat_fires_alone_and_blocks_nothing(case):
    rule, _, field = case.partition("/")
    config = FLAGSHIP.replace(**CAVEAT_CASES[case])
    caveats = export_caveats(config)
    assert export_blockers(config) == [] and [c.rule for c in caveats] == [rule]
    if rule == "hidden_multiple_256":
        assert field in caveats[0].message  # the message names the offending field
    assert {c.partition("/")[0] for c in CAVEAT_CASES} == set(CAVEATS)


def test_gpu_only_shapes_are_caveats_not_blockers():
    """The README demo's model (d_state 64, head_dim 32) exports; what it gives up is named."""
    assert export_caveats(FLAGSHIP) == []
    small = get_preset("mamba-moe-small")
    assert rules(small) == []
    assert sorted(c.rule for c in export_caveats(small)) == ["ssm_head_dim", "ssm_state_size"]
    assert set(CAVEATS) == {"ssm_state_size", "ssm_head_dim", "hidden_multiple_256"} and not set(CAVEATS) & set(RULES)
    assert export_caveats(FLAGSHIP.replace(ssm_state_size=256)) == []


def test_blocker_str():
    blocker = ExportBlocker("moe_router", "switch is not exportable")
    assert str(blocker) == "moe_router: switch is not exportable"
    with pytest.raises(AttributeError):
        blocker.rule = "other"  # frozen
