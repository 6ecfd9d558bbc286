"""A HF transformers Mamba2ForCausalLM, saved and loaded with ``load_hf_mamba2``, gives the same logits."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.convert import config_from_hf, load_hf_mamba2

transformers = pytest.importorskip("transformers")

if importlib.util.find_spec("mamba_ssm") is not None:  # its kernels need CUDA; we compare on CPU
    pytest.skip("mamba_ssm is installed; these CPU comparisons need HF's pure-torch Mamba2 path",
                allow_module_level=True)

TINY = dict(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8, expand=2,
            vocab_size=100, chunk_size=8, conv_kernel=4)


def hf_model(n_groups: int = 1, tied: bool = False, **overrides) -> torch.nn.Module:
    """A tiny random HF Mamba2 (seeded by conftest's fresh seed), with nontrivial norms and D."""
    config = transformers.Mamba2Config(**TINY, n_groups=n_groups, tie_word_embeddings=tied, **overrides)
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # HF's init leaves every norm weight at 1 and D at 1: perturb them so a mix-up would show.
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model


def compare_logits(hf, ours, seq: int = 41) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (2, seq))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits.float()
        got = ours(ids).logits.float()
    assert got.shape == ref.shape
    return rel_error(got, ref)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_groups", [1, 2])
def test_logits_match_hf(tmp_path, n_groups, tied):
    # transformers 5.x's torch path (MambaRMSNormGated) normalises each of the n_groups slices of
    # d_inner separately, like mamba_ssm and like us, so n_groups=2 must match too. Older transformers
    # versions normalised over all of d_inner in their torch path; against those the gated norm would
    # be the only difference at n_groups > 1.
    hf = hf_model(n_groups=n_groups, tied=tied)
    assert (hf.lm_head.weight is hf.backbone.embeddings.weight) == tied
    hf.save_pretrained(tmp_path)
    ours = load_hf_mamba2(tmp_path).eval()
    assert ours.config.ssm_ngroups == n_groups and ours.config.tie_word_embeddings == tied
    assert (ours.lm_head is None) == tied
    err = compare_logits(hf, ours)
    print(f"n_groups={n_groups} tied={tied}: rel. error {err:.3e}")
    assert err < 1e-4


def test_sharded_safetensors_and_torch_bin(tmp_path):
    hf = hf_model(n_groups=2)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert compare_logits(hf, load_hf_mamba2(tmp_path / "sharded").eval()) < 1e-4

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    assert compare_logits(hf, load_hf_mamba2(bin_dir).eval()) < 1e-4


def test_tied_checkpoint_with_lm_head_tensor(tmp_path):
    # Some tied checkpoints still store lm_head.weight; it is a copy of the embedding and is ignored.
    hf = hf_model(tied=True)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert "lm_head.weight" in hf.state_dict()
    assert compare_logits(hf, load_hf_mamba2(tmp_path).eval()) < 1e-4


def test_dtype(tmp_path):
    hf_model().save_pretrained(tmp_path)
    ours = load_hf_mamba2(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_use_bias_refused(tmp_path):
    hf_model(use_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_bias"):
        load_hf_mamba2(tmp_path)


def test_unrepresentable_configs_refused():
    base = json.loads(transformers.Mamba2Config(**TINY).to_json_string())
    config_from_hf(base)  # the unmodified config converts
    config_from_hf({**base, "time_step_limit": [0.0, math.inf]})
    config_from_hf({**base, "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    for key, value in [("time_step_limit", [0.0, 10.0]), ("time_step_limit", [0.01, math.inf]),
                       ("hidden_act", "gelu"), ("num_heads", 6), ("model_type", "mamba")]:
        with pytest.raises(ValueError, match=key):
            config_from_hf({**base, key: value})
    with pytest.raises(ValueError, match="hidden_size"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_mamba2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_mamba2(tmp_path)
    transformers.Mamba2Config(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_hf_mamba2(tmp_path)
