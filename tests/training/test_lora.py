"""The trainer's ``lora:`` section: adapters on a --checkpoint base, only they in the optimizer and only they
change; each checkpoint holds the adapter in PEFT's format beside the merged model; an interrupted LoRA run
resumed equals an uninterrupted one bit for bit; what cannot work is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.training import tiny_config

pytest.importorskip("peft")

from mamba_moe.config import get_preset  # noqa: E402
from mamba_moe.data import load_tokenizer  # noqa: E402
from mamba_moe.growth.lora import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_INFO,
    base_fingerprint,
    load_lora,
    lora_parameters,
    lora_state_dict,
)
from mamba_moe.model import MambaMoEForCausalLM  # noqa: E402
from mamba_moe.training import Trainer  # noqa: E402
from mamba_moe.validation import ConfigError  # noqa: E402

LORA = {"rank": 4, "alpha": 8, "targets": ["in_proj", "out_proj", "q_proj", "v_proj", "o_proj", "experts"]}


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A random mamba-moe-tiny checkpoint with the corpus's tokenizer (seeded apart from the test's RNG)."""
    path = tmp_path_factory.mktemp("lora-base") / "base"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        MambaMoEForCausalLM(get_preset("mamba-moe-tiny", vocab_size=512)).save_pretrained(path)
    load_tokenizer(corpus[0]).save_pretrained(str(path))
    return path


def lora_config(corpus, base, output, **changes):
    return tiny_config(corpus, output, **{"init_from": str(base), "lora": dict(LORA), "weight_decay": 0.0, "lr": 1e-2,
                                          **changes})


def test_only_the_adapter_is_optimized_and_saved(corpus, base, tmp_path) -> None:
    trainer = Trainer(lora_config(corpus, base, tmp_path / "run", max_steps=4, save_every=2)).setup()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapter = lora_parameters(trainer.model)
    assert adapter and in_optimizer == {id(p) for p in adapter}
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    result = trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name
    # lora_B starts at zero; training moved it
    assert any(float(p.detach().abs().max()) > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)

    ckpt = result.checkpoint
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_INFO, "model.safetensors", "trainer_state.pt"):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(base)
    base_model = MambaMoEForCausalLM.from_pretrained(base)
    assert json.loads((ckpt / BASE_INFO).read_text())["fingerprint"] == base_fingerprint(base_model)
    # the optimizer state holds moments for the adapter's tensors only
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == len(adapter)

    # stock PEFT reads the checkpoint's adapter: the tensors the trainer trained
    import peft

    stock = peft.PeftModel.from_pretrained(MambaMoEForCausalLM.from_pretrained(base), str(ckpt))
    theirs = {k.replace(".default", ""): v for k, v in stock.state_dict().items() if "lora_" in k}
    saved = lora_state_dict(trainer.model)
    assert theirs.keys() == saved.keys() and all(torch.equal(theirs[k], saved[k]) for k in saved)

    # model.safetensors is the merged model: its logits are the base + adapter's
    ids = torch.randint(0, 512, (2, 24))
    adapted = load_lora(base_model, ckpt).eval()
    merged = MambaMoEForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
    assert torch.isfinite(got).all()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_interrupted_lora_run_resumes_exactly(corpus, base, tmp_path, fresh_seed) -> None:
    seed = fresh_seed % 10_000
    full = Trainer(lora_config(corpus, base, tmp_path / "straight", max_steps=6, seed=seed)).setup().train()
    cfg = lora_config(corpus, base, tmp_path / "split", max_steps=6, seed=seed)
    first = Trainer(cfg).setup().train(until=3)
    second = Trainer(cfg).setup().train(resume=True)
    assert first.losses + second.losses == full.losses               # bitwise
    a, b = full.checkpoint, second.checkpoint
    from safetensors.torch import load_file

    for name in (ADAPTER_WEIGHTS, "model.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_lora_needs_a_base_and_refuses_what_cannot_work(corpus, base, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^lora: needs the base model to adapt: --checkpoint BASE"):
        Trainer(tiny_config(corpus, tmp_path / "a", lora=dict(LORA))).setup()
    with pytest.raises(ConfigError, match=r"lora: not supported with qat"):
        lora_config(corpus, base, tmp_path / "b", qat={"bits": 4})
    with pytest.raises(ConfigError, match=r"lora\.rnak: unknown key; did you mean 'rank'"):
        tiny_config(corpus, tmp_path / "c", lora={"rnak": 4})
    with pytest.raises(ConfigError, match=r"^lora\.targets\[0\]: 'routr' is not a LoRA target"):
        tiny_config(corpus, tmp_path / "c", lora={"targets": ["routr"]})


def test_resume_refuses_another_lora_section_or_base(corpus, base, tmp_path) -> None:
    run = tmp_path / "run"
    Trainer(lora_config(corpus, base, run, max_steps=2, save_every=2)).setup().train()
    with pytest.raises(ConfigError, match=r"^lora\.rank: the adapter .* was trained with rank=4, this run has 8"):
        Trainer(lora_config(corpus, base, run, max_steps=4, lora={**LORA, "rank": 8})).setup().train(resume=True)
    plain = tiny_config(corpus, run, init_from=str(base), max_steps=4)
    with pytest.raises(ConfigError, match=r"^--resume: .*step-000002 is a checkpoint of a LoRA run"):
        Trainer(plain).setup().train(resume=True)
    other = tmp_path / "other"
    model = MambaMoEForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.embed.weight.mul_(1.01)
    model.save_pretrained(other)
    load_tokenizer(base).save_pretrained(str(other))
    with pytest.raises(ConfigError, match=r"^base: the adapter .* was trained on other weights"):
        Trainer(lora_config(corpus, other, run, max_steps=4)).setup().train(resume=True)


def test_shipped_tiny_lora_config_trains_from_the_cli(base, tmp_path, capsys) -> None:
    from helpers.training import chat_file

    from mamba_moe.cli import main
    from mamba_moe.training import TrainConfig

    shipped = TrainConfig.load("configs/train/tiny/lora.yaml")
    assert shipped.lora is not None and shipped.lora.rank == 8 and "experts" in shipped.lora.targets
    chats = chat_file(tmp_path / "explain.jsonl", "explain", 24)
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/train/tiny/lora.yaml", "--checkpoint", str(base), f"data.path={chats}",
                 f"output={out}", "max_steps=2", "save_every=2", "eval_every=2", "batch_size=2", "eval_batches=1",
                 "data.val_fraction=0.25", "progress=false", "sample_tokens=4"]) == 0
    printed = capsys.readouterr().out
    trained = sum(p.numel() for p in lora_parameters(
        load_lora(MambaMoEForCausalLM.from_pretrained(base), out / "checkpoints" / "step-000002")))
    assert f"LoRA rank 8 on in_proj, out_proj, q_proj, k_proj, v_proj, o_proj, experts: {trained:,} trained" in printed
    assert "step-000002" in printed and "<|im_start|>assistant" in printed        # the sample, from the merged model
