"""Growth and LoRA through the project's trainer: a grown checkpoint's history is carried into every checkpoint
trained from it (and `info` shows it); a LoRA run's output merges with `mamba-moe lora merge` (merged logits ==
adapted logits, rel. 1e-5) and the merged model exports to GGUF (llama.cpp's logits match where installed)."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.llama import LlamaRunner, nmse
from helpers.numerics import rel_error
from helpers.training import tiny_config

pytest.importorskip("peft")

from mamba_moe.cli import main  # noqa: E402
from mamba_moe.config import get_preset  # noqa: E402
from mamba_moe.growth import HISTORY_NAME, read_history  # noqa: E402
from mamba_moe.growth.lora import load_lora  # noqa: E402
from mamba_moe.model.lm import MambaMoEForCausalLM  # noqa: E402
from mamba_moe.training import Trainer  # noqa: E402

LORA = {"rank": 4, "alpha": 8, "targets": ["in_proj", "out_proj", "q_proj", "o_proj", "gate_proj", "experts"]}


@pytest.fixture(scope="module")
def grown(corpus, tmp_path_factory):
    """A perturbed tiny checkpoint grown with `mamba-moe grow --add-experts 4` (4 -> 8 experts)."""
    root = tmp_path_factory.mktemp("trained-growth")
    src = root / "src"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", vocab_size=512))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(src)
    for f in corpus[0].iterdir():
        if f.is_file():
            shutil.copy2(f, src / f.name)
    out = root / "grown"
    assert main(["grow", str(src), "-o", str(out), "--add-experts", "4"]) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_training_carries_the_growth_history(corpus, grown, tmp_path, capsys):
    history = read_history(grown)
    assert [h["operation"] for h in history] == ["add_experts"]
    cfg = tiny_config(corpus, tmp_path / "run", init_from=str(grown), max_steps=4, save_every=2, keep_last=3)
    Trainer(cfg).setup().train(until=2)
    Trainer(cfg).setup().train(resume=True)               # the resumed run keeps writing it
    for step in (2, 4):
        assert read_history(tmp_path / "run" / "checkpoints" / f"step-{step:06d}") == history
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run")]) == 0      # a run folder: its newest checkpoint
    printed = capsys.readouterr().out
    assert "step-000004" in printed and "growth history (1 operation):" in printed
    before, after = history[0]["parameters"]["before"], history[0]["parameters"]["after"]
    assert after > before
    assert "1. add_experts(n_new=4, init=split, seed=0): function-preserving" in printed
    assert f"parameters {before:,} -> {after:,}, {history[0]['time']}" in printed


def test_qat_output_carries_the_growth_history(corpus, grown, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "qat", init_from=str(grown), qat={"bits": 8}, max_steps=1, save_every=1,
                      eval_every=1)
    result = Trainer(cfg).setup().train()
    assert result.quantized is not None and read_history(result.quantized) == read_history(grown)


@pytest.mark.slow
def test_lora_run_merges_and_exports(corpus, grown, tmp_path, capsys):
    run = tmp_path / "lora-run"
    cfg = tiny_config(corpus, run, init_from=str(grown), lora=dict(LORA), max_steps=3, save_every=3, lr=1e-2,
                      weight_decay=0.0)
    result = Trainer(cfg).setup().train()
    ckpt = result.checkpoint
    assert read_history(ckpt) == read_history(grown)      # LoRA runs carry it too
    ids = torch.randint(0, 512, (2, 24))
    base_logits = _logits(MambaMoEForCausalLM.from_pretrained(grown), ids)
    adapted = _logits(load_lora(MambaMoEForCausalLM.from_pretrained(grown), ckpt), ids)
    assert rel_error(adapted, base_logits) > 1e-6          # the adapter trained: it changes the output

    merged_dir = tmp_path / "merged"
    assert main(["lora", "merge", str(grown), str(run), "-o", str(merged_dir)]) == 0   # the run folder as ADAPTER
    assert f"wrote {merged_dir}" in capsys.readouterr().out
    merged = MambaMoEForCausalLM.from_pretrained(merged_dir)
    err = rel_error(_logits(merged, ids), adapted)
    print(f"trainer's LoRA run: merged vs adapted logits, rel. error {err:.2e}")
    assert err < 1e-5
    assert rel_error(_logits(MambaMoEForCausalLM.from_pretrained(ckpt), ids), adapted) < 1e-5  # its own merge
    assert [h["operation"] for h in read_history(merged_dir)] == ["add_experts", "lora_merge"]
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / HISTORY_NAME).is_file()

    gguf = pytest.importorskip("gguf")
    out = tmp_path / "merged.gguf"
    assert main(["export", "gguf", str(merged_dir), "-o", str(out)]) == 0
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["granitehybrid.expert_count"] == merged.config.moe_num_experts == 8
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python not installed: the file is checked, llama.cpp parity not run")
    tokens = ids[0].tolist()
    ours = _logits(merged, torch.tensor([tokens]))[0].double().numpy()
    runner = LlamaRunner(llama_cpp, out, n_ctx=64, threads=1)
    try:
        theirs = runner.prompt_logits(tokens)
    finally:
        runner.close()
    error = nmse(theirs, ours)
    print(f"merged LoRA run: llama.cpp vs ours, f32 NMSE {error:.3g}")
    assert error < 1e-9                                       # the export tests' f32 bound
