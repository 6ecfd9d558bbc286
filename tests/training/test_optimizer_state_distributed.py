"""The optimizer-state layouts that let a checkpoint resume under another strategy or world size
(``training/optimizer_layout.py``): positional (one process, DDP) <-> by-name (FSDP's gathered form), checked
against torch's own by-name form (``get_optimizer_state_dict``) on one process; no process group needed."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from mamba_moe.config import get_preset
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.training.optim import build_optimizer
from mamba_moe.training.optimizer_layout import BY_NAME, POSITIONAL, convert
from mamba_moe.validation import ConfigError


def stepped(expert_hidden: int = 64) -> tuple[MambaMoEForCausalLM, torch.optim.Optimizer]:
    """A tiny model and its AdamW after one step (so every parameter has moments)."""
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_expert_hidden_size=expert_hidden, n_layers=2,
                                           layer_mixers=["mamba", "attention"], layer_ffns=["moe", "moe"]))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    return model, optimizer


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_positional_to_by_name_is_torchs_by_name_form_and_back() -> None:
    model, optimizer = stepped()
    positional = optimizer.state_dict()
    named = convert(positional, POSITIONAL, BY_NAME, model, optimizer, "ckpt")
    torchs = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    assert named["state"].keys() == torchs["state"].keys()
    assert all(_equal(named["state"][k], torchs["state"][k]) for k in torchs["state"])
    assert named["param_groups"] == torchs["param_groups"]

    back = convert(named, BY_NAME, POSITIONAL, model, optimizer, "ckpt")
    assert back["param_groups"] == positional["param_groups"]
    assert back["state"].keys() == positional["state"].keys()
    assert all(_equal(back["state"][k], positional["state"][k]) for k in positional["state"])
    fresh = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    fresh.load_state_dict(back)  # torch accepts it as its own
    assert all(_equal(fresh.state_dict()["state"][k], positional["state"][k]) for k in positional["state"])


def test_a_state_for_another_model_is_refused_naming_the_parameter() -> None:
    model, optimizer = stepped(expert_hidden=64)
    other, other_optimizer = stepped(expert_hidden=32)  # the same parameters, the experts' of another shape
    named = convert(other_optimizer.state_dict(), POSITIONAL, BY_NAME, other, other_optimizer, "ckpt")
    with pytest.raises(ConfigError, match=r"--resume: ckpt: optimizer state [\w.]+\.exp_avg has shape \(\d+"):
        convert(named, BY_NAME, POSITIONAL, model, optimizer, "ckpt")
    with pytest.raises(ConfigError, match=r"--resume: ckpt: optimizer state [\w.]+\.exp_avg has shape"):
        convert(other_optimizer.state_dict(), POSITIONAL, BY_NAME, model, optimizer, "ckpt")


def test_other_parameter_groups_are_refused() -> None:
    model, optimizer = stepped()
    positional = optimizer.state_dict()
    merged = {**positional, "param_groups": [{**positional["param_groups"][0], "params": [
        i for g in positional["param_groups"] for i in g["params"]]}]}
    with pytest.raises(ConfigError, match="parameter groups of .* parameters, this model's optimizer"):
        convert(merged, POSITIONAL, BY_NAME, model, optimizer, "ckpt")
    named = convert(positional, POSITIONAL, BY_NAME, model, optimizer, "ckpt")
    renamed = {**named, "param_groups": [{**g, "params": [f"x.{n}" for n in g["params"]]}
                                         for g in named["param_groups"]]}
    with pytest.raises(ConfigError, match=r"do not fit this model \(unknown: \['x\."):
        convert(renamed, BY_NAME, POSITIONAL, model, optimizer, "ckpt")
