"""Parallelism applied from outside the model: activation checkpointing, DDP or FSDP2, and torch.compile.

The model knows nothing of ranks, shards or compilers (torchtitan's ``parallelize_llama`` seam):
:func:`parallelize` takes the plain model and returns one :class:`Parallel` object, and the training loop
talks only to it wherever the strategies differ — which module a step calls, gradient sync during
accumulation, clipping, the state dicts a checkpoint saves and loads, and a plain model for the sample:

- :class:`Local` (one process) and :class:`DDP` (``DistributedDataParallel``; replicated weights, so the
  state dicts are the model's own and parameter-id keyed optimizer state);
- :class:`FSDP` (``fully_shard`` per block + root, ``fsdp.py``; state dicts gathered to rank 0 and keyed by
  parameter name, loaded back into the shards).

Under DDP and FSDP the MoE layers' balance loss is computed from every rank's routing statistics
(:func:`share_router_statistics`), so it is the one of one process on the global batch. A checkpoint of
any strategy and world size resumes under any other: the weights are whole in every case, the optimizer
state is translated between the two layouts (``optimizer_layout.py``).

Order, as before this module existed (and bitwise resume depends on nothing here changing numerics):
activation checkpointing, then the DDP/FSDP wrapping, then compilation — per block in place, so the
wrappers and checkpoints see the same modules and names, or the whole wrapped forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model import MambaMoEForCausalLM
from ..model.ffn import MoEFeedForward
from ..ops.moe import AcrossRanks
from ..validation import ConfigError
from .checkpoint import load_plain_weights
from .config import TrainConfig
from .distributed import DistInfo, sum_across_ranks
from .optimizer_layout import BY_NAME, POSITIONAL, convert


def choose_strategy(cfg: TrainConfig, dist: DistInfo, device: torch.device, model: nn.Module) -> str:
    """``none`` for one process; under torchrun ``distributed`` (ddp | fsdp), where ``auto`` is FSDP when
    one replica's weights + AdamW state (16 bytes/parameter) would take more than half of a GPU's memory,
    DDP otherwise (and always on CPU)."""
    if not dist.enabled:
        return "none"
    if cfg.distributed != "auto":
        return cfg.distributed
    if device.type != "cuda":
        return "ddp"
    need = 16 * sum(p.numel() for p in model.parameters())
    return "fsdp" if need > 0.5 * torch.cuda.get_device_properties(device).total_memory else "ddp"


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """What ``compile`` means on this device: nothing on CPU; ``auto`` is per-block compilation."""
    if device.type != "cuda":
        return "none"
    return "blocks" if cfg.compile == "auto" else cfg.compile


def _local(t: Tensor) -> Tensor:
    """A parameter's local values (a DTensor's shard under FSDP; the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


class Parallel:
    """One process: the model is called as it is; checkpoints hold its own state dicts."""

    name = "none"
    # How the saved optimizer state is keyed: by parameter position (torch's own state_dict) or by name
    # (FSDP's gathered form); a checkpoint in the other layout is translated on load.
    optimizer_layout = POSITIONAL

    def __init__(self, model: nn.Module, device: torch.device, dist: DistInfo, compile_mode: str) -> None:
        self.model = model
        self.device = device
        self.dist = dist
        self.compile_mode = compile_mode
        self.forward: Any = self._wrap()
        if compile_mode in ("blocks", "blocks-cudagraphs"):
            graph_mode = "reduce-overhead" if compile_mode == "blocks-cudagraphs" else None
            for layer in model.backbone.layers:
                layer.compile(mode=graph_mode)
        elif compile_mode == "model":
            self.forward = torch.compile(self.forward)

    def _wrap(self) -> Any:
        return self.model

    # ---- the step -------------------------------------------------------------------------------
    def begin_micro_step(self) -> None:
        """With CUDA-graph blocks: the previous forward's outputs are consumed, so the graphs may reuse them."""
        if self.compile_mode == "blocks-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: all-reduce gradients only when ``sync`` (the last one)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients' global norm to ``max_norm`` (0 = no clipping) and return the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or float("inf")))

    def parameters_finite(self) -> bool:
        """Whether every weight is finite, on every rank (a collective under torchrun)."""
        with torch.no_grad():
            flags = [torch.isfinite(_local(p)).all() for p in self.model.parameters() if _local(p).numel()]
            bad = 0.0 if not flags else float(~torch.stack(flags).all())
        return sum_across_ranks(bad, self.dist, self.device) == 0

    # ---- checkpoints ----------------------------------------------------------------------------
    def weights_to_save(self) -> dict[str, Tensor] | None:
        """The plain-named weights to save when ``model.state_dict()`` is not them (QAT: the latent float
        weights), or None to let the model save itself."""
        from .qat import is_qat, plain_state_dict

        return plain_state_dict(self.model) if is_qat(self.model) else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load(self, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any],
             source: str, saved_by: str = "none") -> None:
        """Load a checkpoint's weights and optimizer state, written by strategy ``saved_by`` (any)."""
        load_plain_weights(self.model, weights, source)
        optimizer.load_state_dict(self._optimizer_state_for_me(optimizer_state, saved_by, optimizer, source))

    def _optimizer_state_for_me(self, state: dict[str, Any], saved_by: str, optimizer: torch.optim.Optimizer,
                                source: str) -> dict[str, Any]:
        if saved_by not in _STRATEGIES:
            raise ConfigError(f"--resume: {source} was written by an unknown strategy {saved_by!r}")
        return convert(state, _STRATEGIES[saved_by].optimizer_layout, self.optimizer_layout, self.model, optimizer,
                       source)

    def standalone_model(self, checkpoint: Path | None) -> MambaMoEForCausalLM:
        """A model this process can run alone (the end-of-run sample)."""
        return self.model


class DDP(Parallel):
    """``DistributedDataParallel``: gradients all-reduced once per step (``no_sync`` before the last
    micro-batch); the weights are replicated, so checkpoints are written exactly as in one process."""

    name = "ddp"

    def _wrap(self) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(self.model,
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.ddp

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.ddp.no_sync()


class FSDP(Parallel):
    """FSDP2: parameters, gradients and optimizer state sharded; full state dicts gathered to rank 0 for
    checkpoints (collectives: every rank calls them), so the files are those one process writes."""

    name = "fsdp"
    optimizer_layout = BY_NAME

    def __init__(self, model: nn.Module, device: torch.device, dist: DistInfo, compile_mode: str,
                 bf16: bool = False) -> None:
        self.bf16 = bf16
        super().__init__(model, device, dist, compile_mode)

    def _wrap(self) -> Any:
        from .fsdp import shard_model
        from .qat import is_qat

        if is_qat(self.model):
            raise ConfigError("qat: not supported with distributed=fsdp yet (parametrized weights are not "
                              "sharded); use distributed=ddp")
        shard_model(self.model, self.device, bf16=self.bf16)
        return self.model

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync)
        yield

    def clip_grad_norm(self, max_norm: float) -> float:
        from .fsdp import to_float

        return to_float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or float("inf")))

    def weights_to_save(self) -> dict[str, Tensor]:
        from .fsdp import full_model_state

        return full_model_state(self.model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from .fsdp import full_optimizer_state

        return full_optimizer_state(self.model, optimizer)

    def load(self, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any],
             source: str, saved_by: str = "fsdp") -> None:
        from .fsdp import load_full_model_state, load_full_optimizer_state

        load_full_model_state(self.model, weights)
        load_full_optimizer_state(self.model, optimizer,
                                  self._optimizer_state_for_me(optimizer_state, saved_by, optimizer, source))

    def standalone_model(self, checkpoint: Path | None) -> MambaMoEForCausalLM:
        return MambaMoEForCausalLM.from_pretrained(checkpoint, device=self.device)


_STRATEGIES: dict[str, type[Parallel]] = {"none": Parallel, "ddp": DDP, "fsdp": FSDP}


def share_router_statistics(model: nn.Module, dist: DistInfo) -> int:
    """Make every MoE layer's balance loss use the routing statistics of all ranks (``ops.moe.AcrossRanks``);
    returns the number of layers set. DDP and FSDP average gradients over all ranks: the scale is their count."""
    import torch.distributed

    across = AcrossRanks(torch.distributed.group.WORLD, float(dist.world_size))
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer in layers:
        layer.balance_across = across
    return len(layers)


def parallelize(model: MambaMoEForCausalLM, cfg: TrainConfig, dist: DistInfo, device: torch.device,
                amp: bool) -> Parallel:
    """Apply activation checkpointing, the data-parallel strategy and compilation to ``model`` (in place
    where the strategy shards or compiles) and return the object the training loop works through."""
    if cfg.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    name = choose_strategy(cfg, dist, device, model)
    if name != "none":  # before wrapping and compiling, so compiled blocks see the setting from the start
        share_router_statistics(model, dist)
    mode = compile_mode(cfg, device)
    if name == "fsdp":
        return FSDP(model, device, dist, mode, bf16=amp)
    return _STRATEGIES[name](model, device, dist, mode)
