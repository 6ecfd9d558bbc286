"""--router topk:K: same weights, another routing rule; not function-preserving (except top-E), so the loss
change on held-out data is what the operation reports."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.growth import GrowthError, change_router, heldout_loss, parse_router
from mamba_moe.growth.evaluate import heldout_windows, loss_report
from mamba_moe.growth.router import router_change_is_exact


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_soft_to_topk_changes_only_the_rule(make_model, ids):
    model = make_model()
    grown = change_router(model, "topk:2")
    assert (grown.config.moe_router, grown.config.moe_top_k) == ("topk", 2)
    for (name, a), (_, b) in zip(model.state_dict().items(), grown.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not router_change_is_exact(model, "topk:2")
    assert rel_error(logits(grown, ids), logits(model, ids)) > 1e-6   # it does change the output


def test_topk_over_every_expert_is_soft(make_model, ids):
    model = make_model()
    grown = change_router(model, "topk:4")
    assert router_change_is_exact(model, "topk:4")
    assert rel_error(logits(grown, ids), logits(model, ids)) < 1e-10


def test_loss_report_on_held_out_text(make_model, tmp_path):
    from helpers.toy import build_toy_tokenizer

    tok = build_toy_tokenizer(vocab_size=300)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "text" / "b.bin").write_bytes(b"\xff\xfe\x00binary")          # not text: skipped
    windows = heldout_windows(tmp_path / "text", tok, seq_len=16, max_windows=5)
    assert windows.shape == (5, 17)
    model = make_model(vocab_size=len(tok))
    report = loss_report(model, change_router(model, "topk:1"), windows)
    assert report["loss_before"] == pytest.approx(heldout_loss(model, windows))
    assert report["loss_change"] == pytest.approx(report["loss_after"] - report["loss_before"])
    with pytest.raises(GrowthError, match=r"^eval: .* no window of 100001 tokens"):
        heldout_windows(tmp_path / "text" / "a.txt", tok, seq_len=100_000)


def test_errors_name_the_field(make_model):
    model = make_model()
    for spec, pattern in (("topk", r"^router: top-k needs its k"), ("topk:0", r"^router: k must be >= 1"),
                          ("soft:2", r"^router: 'soft' takes no"), ("hash", r"^router: 'hash' is not one of"),
                          ("soft", r"^router: the model already routes with 'soft'"),
                          ("topk:9", r"^moe_top_k: topk:9 needs at least 9 experts")):
        with pytest.raises(GrowthError, match=pattern):
            change_router(model, spec)
    assert parse_router("topk:3") == ("topk", 3)
    with pytest.raises(GrowthError, match=r"^layer_ffns: the model has no MoE layer"):
        change_router(make_model(layer_ffns=["dense"] * 4), "topk:1")
