"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Each hybrid block is one FSDP unit (its parameters are all-gathered just before the block runs and freed
after), the root module holds the embedding/tied head and the final norm. Gradients are reduce-scattered
(averaged), so one step equals one process stepping on the whole global batch, like DDP. Checkpoints are
written from full state dicts gathered on rank 0 (``get_model_state_dict(full_state_dict=True)``), so the
files are the same ``model.safetensors`` a one-process run writes, and ``from_pretrained`` loads them.
Runs on CPU over gloo (torch 2.13) as well as on CUDA over NCCL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Apply ``fully_shard`` to every block, then to the root (in place; returns the model)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {} if mp is None else {"mp_policy": mp}
    for block in model.backbone.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict on rank 0 (CPU tensors), empty on the others. A collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (unsharded) state dict into the sharded model; every rank passes the same dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, gathered on rank 0. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def to_float(x: Tensor | float) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a Python float."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)
