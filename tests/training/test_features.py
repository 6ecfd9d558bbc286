"""Trainer options: TensorBoard scalars, activation checkpointing, domain-guided routing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.training import tiny_config, two_domain_corpus

from mamba_moe.config import ConfigError
from mamba_moe.model.ffn import MoEFeedForward
from mamba_moe.training import Trainer


def test_tensorboard_scalars_match_metrics(corpus, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_config(corpus, tmp_path / "run", max_steps=4, eval_every=2, tensorboard=True)).setup().train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "expert_load/0"):
        assert tag in tags, tags
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [1, 2, 3, 4]
    for e, r in zip(loss, rows, strict=True):  # TensorBoard stores float32
        assert abs(e.value - r["loss"]) <= 1e-6 * abs(r["loss"])
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_activation_checkpointing_gives_the_same_losses(corpus, tmp_path) -> None:
    runs = [Trainer(tiny_config(corpus, tmp_path / str(on), max_steps=3, save_every=3, grad_accum=2,
                                activation_checkpointing=on)).setup() for on in (False, True)]
    assert [r.model.backbone.gradient_checkpointing for r in runs] == [False, True]
    off, on = (r.train().losses for r in runs)
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(on, off, strict=True)), (on, off)


def _expert_probability(trainer: Trainer) -> dict[str, float]:
    """Mean router probability of each domain's preferred expert on that domain's validation tokens,
    averaged over the MoE layers (the quantity the domain-routing loss raises)."""
    expert = trainer.cfg.domain_routing.experts
    probs: list[torch.Tensor] = []

    def hook(module, inputs, output):
        probs.append(F.softmax(inputs[0].float() @ module.router.weight.float().T, -1))  # (b, l, E)

    handles = [m.register_forward_hook(hook) for m in trainer.model.modules() if isinstance(m, MoEFeedForward)]
    sums = {d: 0.0 for d in expert}
    counts = {d: 0 for d in expert}
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.data.val_batches(8):
            probs.clear()
            trainer.model(batch.input_ids)
            for row, dom in enumerate(batch.domain_ids.tolist()):
                name = trainer.data.domains[dom]
                sums[name] += float(sum(p[row, :, expert[name]].mean() for p in probs) / len(probs))
                counts[name] += 1
    for h in handles:
        h.remove()
    assert all(counts.values()), counts
    return {d: sums[d] / counts[d] for d in expert}


def test_domain_routing_raises_each_domains_expert(corpus, tmp_path, fresh_seed) -> None:
    shards = two_domain_corpus(tmp_path, corpus[0])
    data = {"source": "shards", "path": str(shards), "tokenizer": str(corpus[0])}
    routing = {"coef": 1.0, "experts": {"code": 0, "prose": 1}}
    common = {"data": data, "max_steps": 12, "save_every": 12, "eval_every": 12, "batch_size": 4,
              "seed": fresh_seed % 10_000}
    on = Trainer(tiny_config(corpus, tmp_path / "on", domain_routing=routing, **common)).setup()
    off = Trainer(tiny_config(corpus, tmp_path / "off", **common)).setup()
    off.cfg.domain_routing = on.cfg.domain_routing  # for _expert_probability only; the table stays None
    assert on.data.domains == ["code", "prose"] and off.objective.expert_table is None
    before = _expert_probability(on)
    on.train()
    off.train()
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["domain_loss"] < rows[0]["domain_loss"]
    p_on, p_off = _expert_probability(on), _expert_probability(off)
    for dom in ("code", "prose"):
        assert p_on[dom] > p_off[dom] and p_on[dom] > before[dom], (dom, before, p_on, p_off)

    bad = tiny_config(corpus, tmp_path / "bad", domain_routing={"experts": {"poetry": 0}}, **{"data": data})
    with pytest.raises(ConfigError, match=r"domain_routing.experts.poetry: no such data domain .*'code', 'prose'"):
        Trainer(bad).setup()
    bad = tiny_config(corpus, tmp_path / "bad", domain_routing={"experts": {"code": 9}}, **{"data": data})
    with pytest.raises(ConfigError, match="expert 9 out of range"):
        Trainer(bad).setup()


def test_isolated_documents_in_pretraining_windows(corpus, tmp_path) -> None:
    """data.isolate_documents: each document of a window is computed alone, and the position before a new
    document has no target (its next token opens a document it cannot see)."""
    from helpers.numerics import rel_error

    from mamba_moe.data.loader import Batch
    from mamba_moe.training.batches import _packed

    trainer = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=2, seq_len=32,
                                  data={"source": "shards", "path": str(corpus[1]), "tokenizer": str(corpus[0]),
                                        "isolate_documents": True})).setup()
    assert trainer.data.next().document_ids is not None
    # A window with documents starting at 0, 5 and 19 (positions restart there), and one of a single document.
    L = 24
    tokens = torch.randint(4, 512, (2, L + 1))
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(14), torch.arange(5)]), torch.arange(L)])
    step = _packed(Batch(tokens, positions, torch.zeros(2, dtype=torch.long), torch.arange(2)),
                   torch.zeros(1, dtype=torch.long), isolate=True)
    assert step.document_ids.tolist() == [[0] * 5 + [1] * 14 + [2] * 5, [0] * L]
    no_target = (step.targets == -100).nonzero().tolist()
    assert no_target == [[0, 4], [0, 18]]
    assert bool((step.targets[step.targets != -100] == tokens[:, 1:][step.targets != -100]).all())
    # A document starting exactly at the window's last target token: the loader flags it, the target goes.
    flagged = _packed(Batch(tokens, positions, torch.zeros(2, dtype=torch.long), torch.arange(2),
                            last_target_opens=torch.tensor([False, True])), torch.zeros(1, dtype=torch.long),
                      isolate=True)
    assert (flagged.targets == -100).nonzero().tolist() == [[0, 4], [0, 18], [1, L - 1]]
    # ... and the loader sets the flag exactly where the token before the window's last one is a document's
    # closing EOS (every prepared document ends with one), over every window of a short-window view.
    from mamba_moe.data.loader import PackedDataset, PackedLoader

    ds = PackedDataset(corpus[1], 8, "train")
    eos = ds.eos_id
    batch = PackedLoader(ds, batch_size=len(ds), shuffle=False, loop=False)._collate(
        [(0, k) for k in range(ds.streams[0].n_windows)])
    expected = batch.tokens[:, -2] == eos
    assert int(expected.sum()) > 0 and torch.equal(batch.last_target_opens, expected)
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(step.input_ids[:1], document_ids=step.document_ids[:1]).logits[0]
        for lo, hi in ((0, 5), (5, 19), (19, 24)):
            alone = model(step.input_ids[:1, lo:hi]).logits[0]
            assert rel_error(packed[lo:hi], alone) < 1e-4, (lo, hi)
    model.train()
    losses = trainer.train().losses
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
