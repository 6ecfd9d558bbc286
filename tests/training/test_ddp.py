"""Data parallel over 2 gloo processes (torchrun, CPU): DDP and FSDP2 (fully_shard) give the losses of one
process on the same global batch, the router balance loss included (its statistics are all-reduced);
checkpoints resume exactly under FSDP, and across world sizes (2 -> 1, 1 -> 2).

One torchrun launch (starting two Python processes with torch costs ~10 s on the 2-core CI machine) runs:
the balance loss on a seeded batch split over the ranks, FSDP 2 steps + resume + 2 steps, DDP, a
one-process checkpoint resumed under FSDP, then FSDP straight through the CLI. The one-process references
are trained first, in the test process, so the launch can resume one of their checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.numerics import rel_error
from helpers.training import tiny_config, tiny_corpus

from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.ops.moe import load_balancing_loss, route
from mamba_moe.training import Trainer

WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from mamba_moe.cli import main
from mamba_moe.ops.moe import AcrossRanks, load_balancing_loss, route
from mamba_moe.training import TrainConfig, Trainer

fsdp, ddp, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

# The balance loss of this rank's rows; the weight's gradient averaged over the ranks, as DDP does.
case = torch.load(f"{out}/balance-case.pt")
rows = case["rows"][rank]
weight = case["weight"].clone().requires_grad_(True)
logits = case["x"][rows] @ weight
loss = load_balancing_loss(logits, route(logits, "topk", 2).assigned, case["valid"][rows],
                           AcrossRanks(dist.group.WORLD, float(world)))
loss.backward()
grad = weight.grad.clone()
dist.all_reduce(grad)
values = [torch.zeros(()) for _ in range(world)]
dist.all_gather(values, loss.detach())
if rank == 0:
    torch.save({"values": torch.stack(values), "grad": grad / world}, f"{out}/balance-result.pt")

def run(path, name, mode, log=lambda s: None, **kw):
    trainer = Trainer(TrainConfig.load(path, [f"output={out}/{name}"]), log=log).setup()
    assert trainer.parallel == mode, trainer.parallel
    return trainer.train(**kw)
first = run(fsdp, "fsdp-split", "fsdp", until=2)
second = run(fsdp, "fsdp-split", "fsdp", resume=True)
run(ddp, "ddp", "ddp")
run(fsdp, "one-to-fsdp", "fsdp", log=print, resume=True)  # a one-process checkpoint, copied in by the test
if rank == 0:
    json.dump({"split": first.losses + second.losses}, open(f"{out}/fsdp-split.json", "w"))
sys.exit(main(["train", "--config", fsdp, f"output={out}/fsdp"]))  # FSDP through the CLI (ends the group)
'''

# The router balance loss is on, at a coefficient high enough that a balance gradient that is not one
# process's (per-rank statistics, or the ranks' average not scaled back) moves later losses past 1e-5.
MODEL = {"preset": "mamba-moe-tiny", "overrides": {"vocab_size": 512, "moe_aux_loss_coef": 1.0}}
DDP_RUN = {"model": MODEL, "max_steps": 6, "save_every": 2, "eval_every": 6, "grad_accum": 2}
FSDP_RUN = {"model": MODEL, "max_steps": 4, "save_every": 2, "eval_every": 4, "grad_accum": 2, "distributed": "fsdp"}


def balance_case(path: Path) -> dict:
    """24 tokens, 4 experts, 3 of them padding, split unevenly over 2 ranks (10 + 14 rows): seeded."""
    g = torch.Generator().manual_seed(0)
    case = {"x": torch.randn(24, 8, generator=g), "weight": torch.randn(8, 4, generator=g),
            "valid": torch.ones(24, dtype=torch.bool), "rows": [torch.arange(10), torch.arange(10, 24)]}
    case["valid"][[3, 15, 16]] = False
    torch.save(case, path)
    return case


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dp")
    corpus = tiny_corpus(root)
    # one process, batch_size 4 = 2 processes of batch_size 2: the same global batch
    refs = {name: Trainer(tiny_config(corpus, root / f"one-{name}", batch_size=4, **run), log=lambda s: None)
            .setup().train() for name, run in (("ddp", DDP_RUN), ("fsdp", FSDP_RUN))}
    tiny_config(corpus, root / "ddp", batch_size=2, **DDP_RUN).save(root / "ddp.yaml")
    tiny_config(corpus, root / "unused", batch_size=2, **FSDP_RUN).save(root / "fsdp.yaml")
    shutil.copytree(root / "one-fsdp" / "checkpoints" / "step-000002", root / "one-to-fsdp" / "checkpoints" /
                    "step-000002")
    case = balance_case(root / "balance-case.pt")
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "worker.py"), str(root / "fsdp.yaml"), str(root / "ddp.yaml"), str(root)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "corpus": corpus, "proc": proc, "refs": refs, "case": case}


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_steps(got: list[dict], ref: list[dict]) -> None:
    """Same steps; loss, LM loss and aux within 1e-5 relative, expert loads within their rounding (1e-4).
    Same global batch: only the order of float additions differs (measured: ~1e-7)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        for key in ("loss", "lm_loss", "aux"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, got, ref)
        assert max(abs(x - y) for x, y in zip(a["expert_load"], b["expert_load"], strict=True)) <= 1e-4, (a, b)


@pytest.mark.slow
def test_balance_loss_from_two_gloo_processes_is_one_process_loss(launched) -> None:
    case = launched["case"]
    got = torch.load(launched["root"] / "balance-result.pt")
    weight = case["weight"].clone().requires_grad_(True)
    logits = case["x"] @ weight
    ref = load_balancing_loss(logits, route(logits, "topk", 2).assigned, case["valid"])
    ref.backward()
    assert got["values"][0] == got["values"][1]  # every rank holds the global value
    assert abs(float(got["values"][0]) - ref.item()) <= 1e-6 * ref.item()
    assert rel_error(got["grad"], weight.grad) <= 1e-5


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(launched) -> None:
    root = launched["root"]
    _assert_same_steps(_records(root / "ddp"), _records(root / "one-ddp"))
    assert len(_records(root / "ddp")) == 6
    assert (root / "ddp" / "checkpoints" / "step-000006" / "model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_and_resume(launched) -> None:
    root, proc, one = launched["root"], launched["proc"], launched["refs"]["fsdp"]
    split = json.loads((root / "fsdp-split.json").read_text())["split"]
    assert "data-parallel processes: 2 (fsdp)" in proc.stdout and "sample (8 tokens" in proc.stdout
    got = _records(root / "fsdp")
    _assert_same_steps(got, _records(root / "one-fsdp"))
    assert len(got) == 4
    assert split == [r["loss"] for r in got]  # resume under FSDP: bitwise
    # the checkpoint is the full (gathered) state dict: an ordinary model directory
    a = MambaMoEForCausalLM.from_pretrained(root / "fsdp" / "checkpoints" / "step-000004").state_dict()
    b = MambaMoEForCausalLM.from_pretrained(one.checkpoint).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.isfinite(a[k]).all()
        assert (a[k] - b[k]).abs().max() <= 1e-3 * max(float(b[k].abs().max()), 1e-3), k


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "run", "at"), [("ddp", DDP_RUN, 4), ("fsdp", FSDP_RUN, 2)])
def test_two_process_checkpoint_resumes_in_one_process(launched, tmp_path, strategy, run, at) -> None:
    """A DDP checkpoint (positional optimizer state) and an FSDP one (by name): one process with twice the
    batch size continues with the losses of one process straight through."""
    root = launched["root"]
    step = f"step-{at:06d}"
    shutil.copytree(root / strategy / "checkpoints" / step, tmp_path / "run" / "checkpoints" / step)
    lines: list[str] = []
    trainer = Trainer(tiny_config(launched["corpus"], tmp_path / "run", batch_size=4, **run), log=lines.append)
    trainer.setup().train(resume=True)
    assert f"--resume: {tmp_path / 'run' / 'checkpoints' / step} was written by 2 process(es); continuing with 1" \
        in lines
    assert not any("warning" in line for line in lines)
    ref = [r for r in _records(root / f"one-{strategy}") if r["step"] > at]
    _assert_same_steps(_records(tmp_path / "run"), ref)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_fsdp_processes(launched) -> None:
    root = launched["root"]
    assert "written by 1 process(es); continuing with 2" in launched["proc"].stdout
    ref = [r for r in _records(root / "one-fsdp") if r["step"] > 2]
    _assert_same_steps(_records(root / "one-to-fsdp"), ref)


@pytest.mark.slow
def test_resume_with_another_global_batch_warns(launched, tmp_path) -> None:
    """world_size x batch_size changed (2 x 2 saved, 1 x 2 now): the run goes on, with a warning naming both."""
    root = launched["root"]
    shutil.copytree(root / "ddp" / "checkpoints" / "step-000006", tmp_path / "run" / "checkpoints" / "step-000006")
    lines: list[str] = []
    cfg = tiny_config(launched["corpus"], tmp_path / "run", batch_size=2, **{**DDP_RUN, "max_steps": 7})
    Trainer(cfg, log=lines.append).setup().train(resume=True)
    assert any("warning: the global batch changed: it was 2 micro-batch(es) of 4 rows" in line
               and "now 2 of 2" in line for line in lines), lines


def test_a_model_sharing_router_statistics_deep_copies(tmp_path) -> None:
    """``copy.deepcopy`` of a model whose MoE layers hold an ``AcrossRanks`` (a LoRA run under DDP deep-copies
    it at every checkpoint: ``growth.lora.merged_copy``) works, the copy sharing the process group; a process
    group itself cannot be pickled, so a plain dataclass copy raised TypeError on rank 0."""
    import copy

    import torch.distributed as dist

    from mamba_moe.config import get_preset
    from mamba_moe.model.ffn import MoEFeedForward
    from mamba_moe.training.distributed import DistInfo
    from mamba_moe.training.parallelize import share_router_statistics

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", vocab_size=512))
        assert share_router_statistics(model, DistInfo(world_size=1)) > 0
        twin = copy.deepcopy(model)
        layers = [m for m in twin.modules() if isinstance(m, MoEFeedForward)]
        assert layers and all(m.balance_across is not None and m.balance_across.group is dist.group.WORLD
                              for m in layers)
        ids = torch.randint(0, 512, (2, 16))
        twin.train()
        out = twin(ids, targets=ids)  # a training forward of the copy runs its all-reduce (one process here)
        (out.loss + out.aux_loss).backward()
        assert torch.isfinite(out.aux_loss)
    finally:
        dist.destroy_process_group()


def test_resume_on_fewer_gpus_restores_the_rng_of_those_it_has(monkeypatch) -> None:
    """Rank 0 of an N-GPU run saves N CUDA RNG states; resuming on a machine that shows fewer GPUs (a 2 -> 1
    resume) restores those it has instead of failing on a missing device ordinal (CUDA simulated: CPU build)."""
    import torch.cuda.random as cuda_random

    from mamba_moe.training.checkpoint import rng_state, set_rng_state
    from mamba_moe.training.trainer import _rng_for_this_machine

    restored: list[int] = []

    def set_one(state: torch.Tensor, device: int = 0) -> None:
        if device >= 1:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
        restored.append(device)

    saved = {**rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda_random, "set_rng_state", set_one)
    set_rng_state(_rng_for_this_machine(saved))
    assert restored == [0]
    assert _rng_for_this_machine({"torch": saved["torch"]}) == {"torch": saved["torch"]}  # a CPU checkpoint
