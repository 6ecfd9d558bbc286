"""LoRA through PEFT by our module names, expert-wise for the stacked expert weights: only adapters train,
PEFT's adapter format round-trips, merged logits == adapted logits (fp64 1e-10), and an adapter refuses
another base by name."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers.numerics import rel_error

pytest.importorskip("peft")

from mamba_moe.cli import main  # noqa: E402
from mamba_moe.growth import GrowthError, format_history, read_history  # noqa: E402
from mamba_moe.growth.lora import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    apply_lora,
    has_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from mamba_moe.model.lm import MambaMoEForCausalLM  # noqa: E402

EVERYTHING = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "experts"]
ROUTERS = {"soft": {}, "topk": {"moe_router": "topk", "moe_top_k": 2},
           "switch": {"moe_router": "switch", "moe_capacity_factor": 8.0}}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomise_adapter_(model, scale=0.05):
    """lora_B starts at zero (a no-op adapter): give every adapter tensor values, as training would."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, scale)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_merged_equals_adapted(make_model, ids, router):
    base = make_model(layer_ffns=["moe", "dense", "moe", "moe"], ffn_hidden_size=48, **ROUTERS[router])
    ref = logits(base, ids)
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=8, targets=EVERYTHING))
    assert rel_error(logits(model, ids), ref) == 0.0                    # lora_B = 0: unchanged at first
    randomise_adapter_(model)
    adapted = logits(model, ids)
    assert rel_error(adapted, ref) > 1e-3
    merged = merge_lora(model)
    assert not has_lora(merged) and type(merged.backbone.layers[0].ffn.experts).__name__ == "ExpertBank"
    assert list(merged.state_dict()) == list(base.state_dict())
    err = rel_error(logits(merged, ids), adapted)
    print(f"{router}: merged vs adapted rel. error {err:.2e}")
    assert err < 1e-10


@pytest.mark.parametrize("target", ["experts", "experts.down_proj", "gate_proj"])
def test_each_expert_target_takes_effect(make_model, ids, target):
    """Expert-wise LoRA changes the output (the adapted weights reach the method-called expert bank) and
    merges per expert; gate_proj reaches the shared expert, which the soft path otherwise fuses."""
    base = make_model()
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=2, targets=[target]))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(".ffn." in n for n in names)
    randomise_adapter_(model)
    adapted = logits(model, ids)
    assert rel_error(adapted, logits(base, ids)) > 1e-4
    assert rel_error(logits(merge_lora(model), ids), adapted) < 1e-10


def test_adapted_model_decodes_like_the_merged_one(make_model):
    base = make_model(moe_router="topk", moe_top_k=2)
    model = apply_lora(base, LoraSettings(rank=4, targets=EVERYTHING))
    randomise_adapter_(model)
    merged = merge_lora(copy.deepcopy(model))
    prompt = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        caches = model.new_cache(2), merged.new_cache(2)
        a, b = model(prompt, cache=caches[0]).logits[:, -1], merged(prompt, cache=caches[1]).logits[:, -1]
        for _ in range(3):
            assert rel_error(a, b) < 1e-10
            token = b.argmax(-1, keepdim=True)
            a, b = model.decode(token, caches[0]), merged.decode(token, caches[1])


def test_only_the_adapter_trains(make_model, ids):
    base = make_model(dtype=torch.float32)
    model = apply_lora(base, LoraSettings(rank=4, targets=EVERYTHING)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) == len(lora_parameters(model))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


def test_peft_format_round_trip(make_model, ids, tmp_path):
    import peft

    base = make_model()
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, targets=EVERYTHING), base_path="base-dir")
    randomise_adapter_(model)
    adapted = logits(model, ids)
    save_lora(model, tmp_path / "adapter")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (tmp_path / "adapter" / name).is_file()
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.r == 4 and config.base_model_name_or_path == "base-dir" and config.target_parameters
    loaded = load_lora(copy.deepcopy(base), tmp_path / "adapter")
    assert rel_error(logits(loaded, ids), adapted) == 0.0
    # stock PEFT reads the same file into its own wrapper: identical adapter tensors
    stock = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    ours = lora_state_dict(loaded)
    theirs = {k.replace(".default", ""): v for k, v in stock.state_dict().items() if "lora_" in k}
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k].cpu(), ours[k]) for k in ours)


def test_another_base_is_refused_by_name(make_model, tmp_path):
    base = make_model()
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=2))
    save_lora(model, tmp_path / "adapter")
    retrained = copy.deepcopy(base)
    with torch.no_grad():
        retrained.backbone.layers[0].mixer.in_proj.weight.add_(0.01)
    with pytest.raises(GrowthError, match=r"^base: the adapter .* was trained on other weights"):
        load_lora(retrained, tmp_path / "adapter")
    assert not has_lora(retrained)
    load_lora(retrained, tmp_path / "adapter", check_base=False)         # on purpose: allowed
    wider = make_model(d_model=96)
    with pytest.raises(GrowthError, match=r"^base: the adapter .* d_model=64, this base has d_model=96"):
        load_lora(wider, tmp_path / "adapter")
    with pytest.raises(GrowthError, match=r"^adapter: .*adapter_config.json is missing"):
        load_lora(base, tmp_path)


def test_settings_errors_name_the_field(make_model):
    model = make_model(layer_mixers=["mamba"] * 4)
    cases = [({"targets": ["q_prj"]}, r"^lora.targets\[0\]: 'q_prj' is not a LoRA target; did you mean 'q_proj'"),
             ({"targets": ["router"]}, r"^lora.targets\[0\]: 'router' is not a LoRA target"),
             ({"rank": 0}, r"^lora.rank: "),
             ({"dropout": 0.1, "targets": ["experts"]}, r"^lora.dropout: PEFT's LoRA of the stacked expert"),
             ({"ranks": 4}, r"^lora.ranks: unknown key; did you mean 'rank'")]
    for data, pattern in cases:
        with pytest.raises(GrowthError if "targets" in data or "dropout" in data else ValueError, match=pattern):
            LoraSettings.from_dict(data)
    with pytest.raises(GrowthError, match=r"^lora.targets\[0\]: 'q_proj' matches nothing in the model"):
        apply_lora(model, LoraSettings(targets=["q_proj"]))
    with pytest.raises(GrowthError, match=r"^lora.layers\[1\]: layer 7 out of range"):
        apply_lora(model, LoraSettings(layers=[0, 7]))
    apply_lora(model, LoraSettings(targets=["in_proj"], layers=[1]))
    assert {n.split(".")[2] for n, _ in model.named_parameters() if "lora_" in n} == {"1"}
    with pytest.raises(GrowthError, match=r"^lora: the model already has adapters"):
        apply_lora(model, LoraSettings())


def test_cli_merge_writes_a_plain_checkpoint(make_model, ids, tmp_path, capsys):
    from helpers.toy import build_toy_tokenizer

    base = make_model(dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    build_toy_tokenizer().save_pretrained(str(tmp_path / "base"))
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, targets=EVERYTHING))
    randomise_adapter_(model, 0.02)
    adapted = logits(model, ids)
    save_lora(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["lora", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    merged = MambaMoEForCausalLM.from_pretrained(out).eval()
    assert rel_error(logits(merged, ids), adapted) < 1e-5
    assert (out / "tokenizer.json").is_file() and read_history(out)[0]["operation"] == "lora_merge"
    assert format_history(read_history(out)).startswith("1. lora_merge(adapter=")
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "base", other)
    retrained = copy.deepcopy(base)
    with torch.no_grad():
        retrained.embed.weight.mul_(1.1)
    retrained.save_pretrained(other)
    assert main(["lora", "merge", str(other), str(tmp_path / "adapter"), "-o", str(tmp_path / "m2")]) == 2
    assert "base: the adapter" in capsys.readouterr().err and not (tmp_path / "m2").exists()
