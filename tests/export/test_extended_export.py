"""A checkpoint whose YaRN was switched on by `mamba-moe extend-context` exports with it: the GGUF metadata and
the transformers config.json carry the new rope scaling and context, and llama.cpp's logits on a prompt past
the original length match ours (f32 NMSE < 1e-9, the bound of test_gguf_llama_cpp.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.llama import nmse

gguf = pytest.importorskip("gguf")

from mamba_moe.export.gguf_export import export_gguf  # noqa: E402
from mamba_moe.export.hf_export import export_hf  # noqa: E402
from mamba_moe.growth.context import extend_context  # noqa: E402
from mamba_moe.model.lm import MambaMoEForCausalLM  # noqa: E402

ORIGINAL = 64   # the plain checkpoint's context; x4 gives the 256 positions llama.cpp is opened with
F32_NMSE = 1e-9


@pytest.fixture(scope="module")
def extended(make_checkpoint, seed, tmp_path_factory):
    plain = make_checkpoint("flagship", seed, rope_scaling=None, max_position_embeddings=ORIGINAL)
    out = tmp_path_factory.mktemp("extended") / "yarn4"
    extend_context(plain, out, 4, original_length=ORIGINAL)  # no training record beside it: the length is given
    return out


@pytest.fixture(scope="module")
def gguf_file(extended, tmp_path_factory):
    path = tmp_path_factory.mktemp("extended-gguf") / "m.gguf"
    export_gguf(extended, path)
    return path


def test_gguf_and_hf_exports_carry_the_switched_on_yarn(extended, gguf_file, tmp_path):
    kv = {k: f.contents() for k, f in gguf.GGUFReader(str(gguf_file)).fields.items()}
    a = "granitehybrid."
    assert kv[a + "rope.scaling.type"] == "yarn" and kv[a + "rope.scaling.factor"] == 4.0
    assert kv[a + "rope.scaling.original_context_length"] == ORIGINAL and kv[a + "context_length"] == 4 * ORIGINAL

    hf = tmp_path / "hf"
    export_hf(extended, hf)
    config = json.loads((hf / "config.json").read_text())
    assert config["max_position_embeddings"] == 4 * ORIGINAL
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0,
                                         "beta_slow": 1.0}


def test_llama_cpp_runs_the_extended_model_past_the_original_length(extended, gguf_file, tokenizer, llama_runner):
    text = "".join(["def add(a, b):\n    return a + b  # café 東京 🙂\n", "The quick brown fox jumps. "] * 8)
    ids = tokenizer.encode(text, add_special_tokens=False)[: 3 * ORIGINAL]
    assert len(ids) > 2 * ORIGINAL  # well past the original length, where YaRN's interpolation matters
    with torch.no_grad():
        ours = MambaMoEForCausalLM.from_pretrained(extended).eval()(torch.tensor([ids])).logits[0].double().numpy()
    error = nmse(llama_runner(gguf_file, n_ctx=4 * ORIGINAL).prompt_logits(ids), ours)
    print(f"extended checkpoint: llama.cpp vs ours over {len(ids)} positions, f32 NMSE {error:.3g}")
    assert error < F32_NMSE
