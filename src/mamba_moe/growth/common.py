"""What every growth operation shares: its error type, rebuilding a model from a rewritten state dict, and
the logits check that tells a function-preserving operation from one that is not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..config import MambaMoEConfig
from ..model.lm import MambaMoEForCausalLM, load_state_dict_checked
from ..validation import ConfigError


class GrowthError(ConfigError):
    """An operation that the model's shape or the arguments do not allow; the message starts with the field."""


def check_count(where: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools refused), else a GrowthError naming ``where``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GrowthError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fresh weights from ``seed`` without touching the caller's RNG; ``None``: from the global RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fresh_model(config: MambaMoEConfig, like: torch.nn.Module, seed: int | None = None) -> MambaMoEForCausalLM:
    """A newly initialised model for ``config`` with the dtype and device of ``like``."""
    with seeded(seed):
        model = MambaMoEForCausalLM(config)
    return model.to(device=model_device(like), dtype=model_dtype(like))


def old_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model``'s state dict (operations rewrite it without touching the source model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rebuild(config: MambaMoEConfig, like: torch.nn.Module, state: dict[str, Tensor],
            seed: int | None = None) -> MambaMoEForCausalLM:
    """The model of ``config`` holding ``state``; tensors that ``state`` lacks keep their fresh initialisation
    (new layers' input projections, new routers), so every operation states only what it sets."""
    model = fresh_model(config, like, seed)
    full = model.state_dict()
    unknown = sorted(set(state) - set(full))
    if unknown:  # a mapping bug, never a user error
        raise RuntimeError(f"growth: tensors without a place in the grown model: {unknown[:8]}")
    merged = {k: state.get(k, v) for k, v in full.items()}
    load_state_dict_checked(model, merged, "grown model")
    model.train(like.training)
    return model


def check_ids(config: MambaMoEConfig, batch: int = 2, length: int = 48, seed: int = 0) -> Tensor:
    """Token ids for the logits check: random, reproducible, no longer than the model's context."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, min(length, config.max_position_embeddings)), generator=gen)


@torch.no_grad()
def logits_rel_error(before: MambaMoEForCausalLM, after: MambaMoEForCausalLM, ids: Tensor) -> float:
    """max |after - before| / max |before| over the logits of ``ids`` (both models in eval mode)."""
    modes = before.training, after.training
    before.eval()
    after.eval()
    try:
        ref = before(ids.to(model_device(before)), router_stats=False).logits.double()
        got = after(ids.to(model_device(after)), router_stats=False).logits.double()
    finally:
        before.train(modes[0])
        after.train(modes[1])
    scale = ref.abs().max().clamp(min=1e-30)
    return float((got.cpu() - ref.cpu()).abs().max() / scale)


def default_tolerance(dtype: torch.dtype) -> float:
    """The logits check's bound for a function-preserving operation, by the dtype the models compute in."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)


def config_changes(before: MambaMoEConfig, after: MambaMoEConfig) -> dict[str, list]:
    """{field: [old, new]} for every config field the operation changed."""
    a, b = before.to_dict(), after.to_dict()
    return {k: [a[k], b[k]] for k in b if a.get(k) != b[k]}
