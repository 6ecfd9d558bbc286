"""TrainConfig: YAML with a preset base, dotted key=value overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from mamba_moe.config import ConfigError
from mamba_moe.training import TrainConfig


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_with_overrides(tmp_path) -> None:
    path = _write(tmp_path, "model:\n  preset: mamba-moe-tiny\nlr: 0.001\nmin_lr: 0.0001\n")
    cfg = TrainConfig.load(path, ["lr=2e-3", "model.overrides.d_model=96", "data.vocab_size=1024",
                                  "betas=[0.8, 0.9]", "compile=true"])
    assert cfg.lr == 2e-3 and cfg.betas == [0.8, 0.9] and cfg.compile == "blocks"  # true reads as blocks
    assert cfg.data.vocab_size == 1024
    assert cfg.model.build().d_model == 96


@pytest.mark.parametrize("text, overrides, needle", [
    ("lr: 0.001\nmax_step: 3\n", [], "did you mean 'max_steps'"),
    ("lr: 0.001\n", ["data.vocab_sise=12"], "did you mean 'vocab_size'"),
    ("lr: 0.001\n", ["warmpu=3"], "did you mean 'warmup'"),
    ("schedule: cosin\n", [], "did you mean 'cosine'"),
    ("model:\n  preset: mamba-moe-smal\n", [], "did you mean 'mamba-moe-small'"),
    ("lr: 0.001\nmin_lr: 0.01\n", [], "min_lr"),
    ("lr: 0.001\n", ["batch_size=0"], "batch_size"),
    ("lr: 0.001\n", ["nokey"], "key=value"),
    ("lr: 0.001\n", ["distill.alpah=0.3"], "did you mean 'alpha'"),
    ("lr: 0.001\n", ["distill.alpha=0.3"], "distill.teacher: required"),
    ("distill: {teacher: x, alpha: 2}\n", [], "distill.alpha"),
    ("lr: 0.001\n", ["distributed=fdsp"], "did you mean 'fsdp'"),
    ("lr: 0.001\n", ["qat.bits=3"], "qat.bits: must be 4 or 8"),
    ("lr: 0.001\n", ["data.source=chats"], "did you mean 'chat'"),
    ("data: {source: chat}\n", [], "data.path: required"),
    ("lr: 0.001\n", ["domain_routing.coef=0.1"], "domain_routing.experts"),
    ("lr: 0.001\n", ["domain_routing.experts={code: -1}"], "domain_routing.experts.code"),
    ("lr: 0.001\n", ["activation_checkpointing=yes please"], "activation_checkpointing"),
    ("lr: 0.001\n", ["compile=block"], "did you mean 'blocks'"),
    ("grad_accum: 2\n", ["compile=blocks-cudagraphs"], "blocks-cudagraphs needs grad_accum: 1"),
])
def test_errors_name_the_key(tmp_path, text, overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.load(_write(tmp_path, text), overrides).model.build()


def test_shipped_configs_load() -> None:
    demo = TrainConfig.load("configs/train/demo.yaml")
    assert demo.model.build().vocab_size == demo.data.vocab_size
    flagship = TrainConfig.load("configs/train/stage1_pretrain.yaml")
    assert flagship.model.build().d_model == 1024 and flagship.schedule == "wsd"


def test_qat_group_size_and_distill_with_packing_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="qat.group_size"):
        TrainConfig.from_dict({"qat": {"bits": 4, "group_size": 3}})
    with pytest.raises(ConfigError, match="distill"):
        TrainConfig.from_dict({"distill": {"teacher": "smollm2"}, "data": {"isolate_documents": True}})


@pytest.mark.parametrize("overrides, needle", [
    (["lr=.inf"], r"^[^:]*c\.yaml: lr: must be a finite number >= 0 \(got inf\)"),
    (["lr=.nan"], r"lr: must be a finite number"),
    (["min_lr=-.inf"], r"min_lr: must be a finite number"),
    (["grad_clip=.inf"], r"grad_clip: must be a finite number"),
    (["distill={teacher: t, temperature: .inf}"], r"distill.temperature: must be a finite number"),
    (["domain_routing={coef: .nan, experts: {code: 0}}"], r"domain_routing.coef: must be a finite number"),
    # TypeErrors from comparisons used to surface as "config: '<' not supported ..."
    (["lr=[1]"], r"c\.yaml: lr: must be a finite number"),
    (["betas=5"], r"betas: need two numbers"),
    (["data.val_fraction=[0.1]"], r"data.val_fraction: must be a finite number"),
    (["qat={bits: [4]}"], r"qat.bits: must be 4 or 8"),
    (["domain_routing={experts: {code: x}}"], r"domain_routing.experts.code: must be a non-negative integer"),
    (["model.overrides=5"], r"model.overrides: expected a mapping, got int"),
    (["model=5"], r"model: expected a mapping, got int"),
    (["output=null"], r"output: must be a directory path \(got None\)"),
    (["device=foo"], r"device: 'foo' is not a device; use auto, cpu, cuda or cuda:N"),
    (["seed=1.5"], r"seed: must be a non-negative integer \(got 1.5\)"),
    (["seed=-1"], r"seed: must be a non-negative integer"),
    (["seed=4294967296"], r"seed: must be below 2\*\*32"),
    (["sample_tokens=-1"], r"sample_tokens: must be a non-negative integer \(got -1\)"),
    (["sample_prompt=''"], r"sample_prompt: must be a non-empty string"),
    (["data.max_docs=0"], r"data.max_docs: must be a positive integer or null"),
    (["lr=[1"], r"override 'lr=\[1': the value is not valid YAML"),
])
def test_bad_values_are_refused_by_name(tmp_path, overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        TrainConfig.load(_write(tmp_path, "lr: 0.001\n"), overrides)
    assert "config: " not in str(info.value)


def test_config_path_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is a directory; give a training config file"):
        TrainConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="training config not found"):
        TrainConfig.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"lr: 0.001\nsample_prompt: \xff\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid UTF-8 at byte"):
        TrainConfig.load(bad)


def test_sample_tokens_zero_needs_no_prompt() -> None:
    assert TrainConfig.from_dict({"sample_tokens": 0, "sample_prompt": ""}).sample_tokens == 0
