"""Held-out loss on shards (evaluation/heldout.py): the chunked per-position loss against plain
cross-entropy, the trainer's own validation, causality and the piecewise (shorter-context) scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.training import tiny_config

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.data.shards import load_manifest
from mamba_moe.evaluation.heldout import (
    bucket_means,
    bytes_per_token,
    heldout_loss,
    loss_by_position,
    position_losses,
    windows,
)
from mamba_moe.training import Trainer


def _model(seed: int) -> MambaMoEForCausalLM:
    torch.manual_seed(seed)
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", vocab_size=512)).double().eval()


def test_position_losses_equal_plain_cross_entropy(fresh_seed) -> None:
    model = _model(fresh_seed)
    gen = torch.Generator().manual_seed(fresh_seed)
    batch = torch.randint(0, 512, (2, 41), generator=gen)
    got = position_losses(model, batch, chunk=7)   # chunks that do not divide the length
    logits = model(batch[:, :-1]).logits
    want = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    assert got.shape == (2, 40) and torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)


def test_heldout_loss_is_the_trainers_validation_loss(corpus, tmp_path, fresh_seed) -> None:
    """The same windows (the val split in file order) and the same mean per target token as
    Trainer.evaluate, for a model it has just trained: the two implementations agree to fp32 rounding."""
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=2, eval_every=2, eval_batches=3, seed=fresh_seed % 1000)
    trainer = Trainer(cfg).setup()
    trainer.train()
    want = trainer.evaluate()["val_loss"]
    got = heldout_loss(trainer.model.eval(), corpus[1], cfg.seq_len, cfg.eval_batches * cfg.batch_size,
                       batch_size=cfg.batch_size)
    assert got.tokens == cfg.eval_batches * cfg.batch_size * cfg.seq_len
    assert math.isfinite(got.loss) and abs(got.loss - want) <= 1e-5 * want
    assert got.bits_per_byte == pytest.approx(got.loss / math.log(2) / bytes_per_token(corpus[1]))


def test_long_window_scores_its_prefix_as_a_short_one_would(corpus, fresh_seed) -> None:
    """Causality: positions < 32 of 64-token windows have the losses of 32-token windows over the same text;
    and scoring 64-token windows in 32-token pieces gives exactly the losses of the 32-token windows."""
    model = _model(fresh_seed)
    long = loss_by_position(model, corpus[1], 64, 3)
    pieces = loss_by_position(model, corpus[1], 64, 3, context=32)
    short = torch.stack([position_losses(model, w[None])[0] for w in windows(corpus[1], 32, 6)]).double()
    short = short.reshape(3, 64).mean(0).numpy()        # windows 2i, 2i + 1 of 32 = window i of 64
    assert long.shape == pieces.shape == (64,)
    assert abs(long[:32] - short[:32]).max() < 1e-9
    assert abs(pieces - short).max() < 1e-9
    assert abs(long[32:] - pieces[32:]).max() > 1e-6    # the longer context did change the second half


def test_bytes_per_token_and_buckets(corpus) -> None:
    manifest = load_manifest(corpus[1])
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    assert bytes_per_token(corpus[1]) == sum(s["text_bytes"] for s in val) / sum(s["n_tokens"] for s in val) > 1
    assert bucket_means([1.0, 3.0, 5.0, 7.0], [0, 1, 4]) == [(0, 1, 1.0), (1, 4, 5.0)]
    with pytest.raises(ValueError, match="edges"):
        bucket_means([1.0, 2.0], [0, 3])
    with pytest.raises(ValueError, match="divide"):
        loss_by_position(_model(0), corpus[1], 64, 1, context=24)
    with pytest.raises(ValueError, match="windows"):
        next(windows(corpus[1], 32, 10**6))
    with pytest.raises(ValueError, match="at least 1"):
        heldout_loss(_model(0), corpus[1], 32, 0)
