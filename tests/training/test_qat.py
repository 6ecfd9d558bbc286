"""QAT in the trainer: exact resume with fake-quantized weights, plain checkpoints, the converted final model."""

from __future__ import annotations

import torch
from helpers.training import tiny_config, tiny_corpus

from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.ops.quant import fake_quantize
from mamba_moe.training import Trainer
from mamba_moe.training.qat import is_qat, qat_targets


def test_qat_resume_is_exact_and_checkpoints_are_plain(tmp_path, fresh_seed) -> None:
    corpus = tiny_corpus(tmp_path)
    seed = fresh_seed % 10_000
    # d_model 64, expert hidden 64: every quantized weight's rows split into 32-groups
    qat = {"bits": 4, "group_size": 32}
    straight = Trainer(tiny_config(corpus, tmp_path / "straight", max_steps=4, seed=seed, qat=qat)).setup()
    assert is_qat(straight.model) and len(straight.qat_names) == len(qat_targets(straight.model)) > 0
    full = straight.train()

    split_cfg = tiny_config(corpus, tmp_path / "split", max_steps=4, seed=seed, qat=qat)
    first = Trainer(split_cfg).setup().train(until=2)
    assert first.quantized is None  # only at max_steps
    second = Trainer(split_cfg).setup().train(resume=True)
    assert first.losses + second.losses == full.losses  # bitwise

    plain = MambaMoEForCausalLM.from_pretrained(full.checkpoint)  # plain names: loads as an ordinary model
    latent = {k: v for k, v in plain.state_dict().items()}
    assert all(torch.equal(latent[k], v) for k, v in
               MambaMoEForCausalLM.from_pretrained(second.checkpoint).state_dict().items())

    # final-quantized: the converted model, weights on the 4-bit grid of the latent ones
    assert full.quantized == tmp_path / "straight" / "final-quantized"
    quant = MambaMoEForCausalLM.from_pretrained(full.quantized).state_dict()
    for name in straight.qat_names:
        assert torch.equal(quant[name], fake_quantize(latent[name], 4, 32)), name
        assert not torch.equal(quant[name], latent[name]), name
    kept = [k for k in latent if k not in straight.qat_names]
    assert kept and all(torch.equal(quant[k], latent[k]) for k in kept)
    # the quantized model's eval loss is the QAT model's eval loss (what QAT trained against)
    ids = torch.randint(4, 512, (2, 16))
    straight.model.eval()
    with torch.no_grad():
        live = straight.model(ids, labels=ids).loss
        converted = MambaMoEForCausalLM.from_pretrained(full.quantized)(ids, labels=ids).loss
    assert torch.isfinite(live) and abs(float(live) - float(converted)) < 1e-5 * float(live)
