"""Data parallelism from outside the model: process-group setup from torchrun's environment, DDP wrapping.

The model knows nothing of ranks (torchtitan's seam). One process = the plain path; ``torchrun
--nproc_per_node N`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the same config runs data-parallel:
each rank reads its slice of the same global batch (``PackedLoader(rank=, world_size=)``), DDP averages
gradients, so the update equals one process stepping on the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_command(nproc: int | str) -> list[str]:
    """The command that runs ``mamba-moe train`` on ``nproc`` processes of one machine (docs/training.md shows
    it; the tests launch it; ``--time-limit`` prints it to continue): arguments follow, ``--config FILE ...``."""
    return ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "mamba_moe", "train"]


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def mean_across_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Average of per-rank scalars (the logged loss is the global batch's mean, like one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def sum_across_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """Sum of a per-rank scalar (e.g. the global batch's count of target tokens)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0])


def sum_tensor_across_ranks(t: Tensor, info: DistInfo) -> Tensor:
    """Elementwise sum of a tensor over the ranks (a new tensor; ``t`` itself for one process)."""
    if not info.enabled:
        return t
    total = t.clone()
    dist.all_reduce(total)
    return total


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
