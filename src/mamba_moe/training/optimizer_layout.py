"""The two layouts of a checkpoint's optimizer state, and the conversion between them.

- ``positional``: torch's own ``Optimizer.state_dict()``, written by one process and by DDP: states and
  parameter groups keyed by the parameter's position in the optimizer.
- ``by-name``: the gathered form FSDP writes (``get_optimizer_state_dict(full_state_dict=True)``): keyed by
  the parameter's name in the model.

Both hold whole (unsharded) tensors, so a checkpoint of any strategy and any number of processes can be
read by any other once the keys are translated: the parameters' names in the reading optimizer's order.
Positions are the order in which ``build_optimizer`` lists the parameters, the same for every strategy
(sharding keeps names and order); every state tensor's shape is checked against its parameter anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..validation import ConfigError

POSITIONAL, BY_NAME = "positional", "by-name"


def grouped_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters, group by group, in its order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def convert(state: dict[str, Any], saved: str, wanted: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            source: str) -> dict[str, Any]:
    """``state`` (in layout ``saved``) in layout ``wanted``, for ``optimizer`` over ``model``'s parameters."""
    if saved == wanted:
        return state
    groups = grouped_names(model, optimizer)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a DTensor's shape is the whole one
    if saved == POSITIONAL:
        named = _positional_to_by_name(state, groups, source)
    else:
        named = state
    _check(named, groups, shapes, source)
    return named if wanted == BY_NAME else _by_name_to_positional(named, groups)


def _positional_to_by_name(state: dict[str, Any], groups: list[list[str]], source: str) -> dict[str, Any]:
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(g) for g in groups]:
        raise ConfigError(f"--resume: {source}: the optimizer state has parameter groups of {sizes} parameters, "
                          f"this model's optimizer {[len(g) for g in groups]}; it was written for another model")
    flat = [n for g in groups for n in g]
    index = [i for g in state["param_groups"] for i in g["params"]]
    name_of = dict(zip(index, flat, strict=True))
    return {"state": {name_of[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]}


def _by_name_to_positional(state: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    # Optimizer.load_state_dict pairs a saved group's ids with the live group's parameters in order.
    position = {n: i for i, n in enumerate(n for g in groups for n in g)}
    return {"state": {position[n]: v for n, v in state["state"].items()},
            "param_groups": [{**saved, "params": [position[n] for n in names]}
                             for saved, names in zip(state["param_groups"], groups, strict=True)]}


def _check(state: dict[str, Any], groups: list[list[str]], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The by-name state fits: the same parameters in the same groups, every moment the parameter's shape."""
    saved = [sorted(g["params"]) for g in state["param_groups"]]
    if saved != [sorted(g) for g in groups]:
        extra = sorted({n for g in saved for n in g} - set(shapes))
        missing = sorted(set(shapes) & {n for g in groups for n in g} - {n for g in saved for n in g})
        raise ConfigError(f"--resume: {source}: the optimizer state's parameter groups do not fit this model "
                          f"(unknown: {extra[:4]}, missing: {missing[:4]})")
    for name, moments in state["state"].items():
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shapes[name]:
                raise ConfigError(f"--resume: {source}: optimizer state {name}.{key} has shape "
                                  f"{tuple(value.shape)}, the parameter {shapes[name]}")
