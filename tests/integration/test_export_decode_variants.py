"""bench/export_decode.py's --variants: each variant's FIELD=VALUE list becomes the config fields it names."""

from __future__ import annotations

import pytest
from helpers.bench import import_bench


@pytest.fixture(scope="module")
def export_decode():
    yield from import_bench("export_decode")


def test_a_list_value_keeps_its_commas_and_fields_split_at_the_next_name(export_decode):
    mixers = ["mamba"] * 5 + ["attention"]
    text = f"attn_num_heads=8,layer_mixers=[{', '.join(mixers)}],moe_router=topk, moe_top_k=2"
    assert export_decode.parse_variant(text) == {"attn_num_heads": 8, "layer_mixers": mixers,
                                                 "moe_router": "topk", "moe_top_k": 2}
    assert export_decode.parse_variant("preset") == {}


def test_an_item_without_a_field_name_is_refused_by_name(export_decode):
    with pytest.raises(SystemExit, match="'=8' is not FIELD=VALUE"):
        export_decode.parse_variant("=8")


def test_variant_names_stay_short_enough_for_a_file_name(export_decode):
    assert export_decode.variant_name("p", {"attn_num_heads": 8}) == "p-attn_num_heads8"
    assert export_decode.variant_name("p", {"layer_mixers": ["mamba"] * 24}) == "p-layer_mixersmamba24"
    mixed = export_decode.variant_name("p", {"layer_mixers": ["mamba", "attention"] * 12})
    other = export_decode.variant_name("p", {"layer_mixers": ["attention", "mamba"] * 12})
    assert len(mixed) < 60 and mixed != other
