"""``export hf``: the GraniteMoeHybridForCausalLM directory, loaded by transformers itself (no remote code).

Parity: logits within fp32 rel. error 1e-4 (max |a - e| / max |e|; measured ~5e-7), and ``generate()`` greedy
equal to ours token for token, for the flagship-shaped model (ngroups 2, diff2, soft MoE + shared expert,
YaRN, factorized tied embedding), a top-k model without shared expert, and a transformer-shaped one.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.export.errors import ExportError
from mamba_moe.export.hf_export import export_hf, hf_blockers
from mamba_moe.model.lm import MambaMoEForCausalLM

pytestmark = pytest.mark.slow

PROMPT = "def greet(name):\n    return f\"Hello, {name}!\"  # café 東京 🙂\nThe quick brown fox jumps."
GREEDY_TOKENS = 10
TEXTS = [
    "def f(x):\n    return x ** 2  # square\n\n\n\tif x  >=  3: pass",
    "Unicode: naïve café, Größe, 東京タワー, Привет, emoji 🙂🚀👩‍💻",
    "digits 1 12 123 1234 12345 3.14159 -42",
    "contractions: it's I'M we'Re they've",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "   whitespace   runs \t\n\n  ",
]


@pytest.fixture(scope="module")
def hf_dirs(make_checkpoint, seed, tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"hf-{variant}")
            export_hf(make_checkpoint(variant, seed), out)
            cache[variant] = out
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["flagship", "topk", "transformer"])
def test_transformers_logits_and_generate_match(variant, hf_dirs, make_checkpoint, seed, tokenizer):
    from transformers import AutoModelForCausalLM

    out = hf_dirs(variant)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "GraniteMoeHybridForCausalLM"
    ours = MambaMoEForCausalLM.from_pretrained(make_checkpoint(variant, seed)).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
    error = rel_error(got, expected)
    assert error < 1e-4, f"{variant}: rel. error {error:.3g} (seed {seed})"

    with torch.no_grad():
        generated = theirs.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        seq, rows = ids, []
        for _ in range(len(generated)):
            row = ours(seq).logits[0, -1]
            rows.append(row)
            seq = torch.cat([seq, row.argmax().view(1, 1)], dim=1)
    mine = seq[0, ids.shape[1]:].tolist()
    for step, (a, b) in enumerate(zip(mine, generated, strict=True)):
        if a != b:   # allowed only at a genuine tie of our top two logits; the sequences part there
            top = torch.topk(rows[step], 2).values
            assert float(top[0] - top[1]) < 1e-4 * float(rows[step].abs().max()), (variant, mine, generated)
            break
    if len(generated) < GREEDY_TOKENS:   # generate stopped early: only at an end token
        assert generated[-1] in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    print(f"{variant}: transformers rel. error {error:.3g}, greedy {generated}")


def test_config_and_tokenizer(hf_dirs, tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    out = hf_dirs("flagship")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "granitemoehybrid" and config.position_embedding_type == "rope"
    assert config.head_dim == 64 and config.num_attention_heads == 4          # diff2: 2h heads
    assert config.attention_multiplier == pytest.approx(1 / 8)
    assert config.num_experts_per_tok == config.num_local_experts == 4       # soft router: all experts
    assert config.mamba_n_groups == 2
    theirs = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is 2 + 2? 東京"}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=False)
    assert theirs.apply_chat_template(messages, **kwargs) == tokenizer.apply_chat_template(messages, **kwargs)


def test_zero_shared_mlp_for_moe_without_shared_expert(hf_dirs):
    from safetensors.numpy import load_file

    weights = load_file(str(hf_dirs("topk") / "model.safetensors"))
    assert not np.any(weights["model.layers.0.shared_mlp.output_linear.weight"])
    assert weights["model.layers.0.block_sparse_moe.input_linear.weight"].shape == (4, 512, 256)  # cat(gate, up)


def test_blockers_and_bad_input(make_checkpoint, seed, tmp_path):
    from mamba_moe.config import get_preset

    assert [b.rule for b in hf_blockers(get_preset("mamba-r1"))] == ["ffn_activation", "moe_router"]
    assert hf_blockers(get_preset("mamba-moe-300m")) == [] and hf_blockers(get_preset("mamba-moe-small")) == []
    with pytest.raises(ExportError, match="moe_router"):
        export_hf(make_checkpoint("flagship", seed, moe_router="switch"), tmp_path / "x")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("flagship", seed), ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json"):
        export_hf(ckpt, tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="not a directory"):
        export_hf(make_checkpoint("flagship", seed), tmp_path / "file")
    assert not (tmp_path / "x").exists()


def test_interrupted_export_leaves_no_directory(make_checkpoint, seed, tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hf(make_checkpoint("flagship", seed), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli(make_checkpoint, seed, tmp_path, capsys):
    from mamba_moe.cli import main

    assert main(["export", "hf", str(make_checkpoint("transformer", seed)), "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists() and "GraniteMoeHybridForCausalLM" in capsys.readouterr().out
