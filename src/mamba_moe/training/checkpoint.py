"""Training checkpoints: a complete inference directory plus everything an exact resume needs.

Layout of ``<output>/checkpoints/step-000123/``::

    model.safetensors, config.json            MambaMoEForCausalLM.save_pretrained
    tokenizer.json, tokenizer_config.json, …  AutoTokenizer.from_pretrained(dir) works
    train_config.yaml                          the TrainConfig of the run
    trainer_state.pt                           optimizer, step, loader state, RNG states (python, numpy, torch)
    growth.json                                the growth history of the --checkpoint it started from, if any
    adapter_config.json, adapter_model.safetensors, mamba_moe_base.json
                                               LoRA runs: the adapter (PEFT format); model.safetensors is then
                                               the base with the adapter merged in

Each checkpoint is written into a hidden temp directory, fsync'ed file by file and renamed into place
(``atomic_directory``), so a crash, a power loss or a full disk leaves the previous checkpoints untouched;
only ``keep_last`` finished ones are kept. Whether a directory is a complete checkpoint is decided in one
place, ``mamba_moe.checkpoint_dirs`` (also used by ``generate``/``chat``/``serve``).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import TMP_MARK, atomic_directory
from ..checkpoint_dirs import STATE_NAME, STEP_DIR, WEIGHTS_NAME, CheckpointError, newest_complete, resolve_model_dir
from ..validation import ConfigError

# Keys every trainer_state.pt holds; a file without them was not written by a trainer.
_STATE_KEYS = ("step", "optimizer", "loader", "rng")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temp directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_NAME).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that is complete enough to resume from, or None."""
    return newest_complete(root, resume=True, notify=None)


def write_weights(path: str | Path, model_config: Any, weights: dict[str, Tensor]) -> None:
    """``model.safetensors`` + ``config.json`` as ``save_pretrained`` writes them, from a state dict with
    plain names (gathered from FSDP shards, or the latent weights of a QAT model)."""
    from safetensors.torch import save_file

    from ..model.lm import CONFIG_NAME, WEIGHTS_NAME

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path / WEIGHTS_NAME),
              metadata={"format": "pt"})
    model_config.save(path / CONFIG_NAME)


def save_checkpoint(root: str | Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any],
                    config_yaml: str, keep_last: int, weights: dict[str, Tensor] | None = None,
                    extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the newest ``keep_last``.

    ``weights``: the model's state dict under plain names when ``model.state_dict()`` is not that (QAT
    parametrizations, FSDP shards, a LoRA run's merged model); ``model.save_pretrained`` is used otherwise.
    ``extra_files(directory)`` writes further files into the checkpoint before it is renamed into place
    (a LoRA adapter, the growth history)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_directory(final) as tmp:  # a step written again (a resumed run) is replaced whole
        if weights is None:
            model.save_pretrained(tmp)
        else:
            write_weights(tmp, model.config, weights)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "train_config.yaml").write_text(config_yaml)
        torch.save(state, tmp / STATE_NAME)
        if extra_files is not None:
            extra_files(tmp)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete the temporaries (``.tmp-step-*``, ``.old-step-*``) that runs killed mid-write left in ``root``.

    Only safe while holding the output directory's lock (``run_lock``): then no live trainer can own them.
    Saving never does this, so a save cannot delete another process's checkpoint in progress."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith((f"{TMP_MARK}step-", ".old-step-")) and p.is_dir()]
    for leftover in found:
        shutil.rmtree(leftover, ignore_errors=True)
    return found


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (our own file: full unpickling is intended); a damaged
    file is a ``CheckpointError`` naming it."""
    file = Path(path) / STATE_NAME
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; not a checkpoint to resume from") from None
    except Exception as err:  # truncated zip, bad pickle, wrong format: all mean the same to the user
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err}); the file is damaged") from err
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CheckpointError(f"{file}: not a trainer state (expected the keys {', '.join(_STATE_KEYS)})")
    return state


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """``model.safetensors`` of a checkpoint directory as plain-named CPU tensors; damage is named."""
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except Exception as err:  # safetensors raises its own error type for a bad header or short file
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err}); the file is damaged") from err


def resolve_init_checkpoint(path: str | Path, log: Any = None) -> Path:
    """The checkpoint directory ``--checkpoint`` names: a checkpoint itself (``config.json`` +
    ``model.safetensors``), or a run's output folder / its ``checkpoints/`` (then the newest complete one
    in it; damaged newer ones are reported through ``log``)."""
    try:
        return resolve_model_dir(path, notify=log)
    except CheckpointError as err:
        raise ConfigError(f"--checkpoint {err}") from err


def plain_name(name: str) -> str:
    """``a.parametrizations.weight.original`` (torch parametrize) -> ``a.weight``."""
    return re.sub(r"\.parametrizations\.([^.]+)\.original$", r".\1", name)


def load_plain_weights(model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
    """Load a plain-named state dict into ``model``, also when its weights are parametrized (QAT): every
    tensor is copied in place, so parameter identity (and an optimizer built on them) is kept."""
    from ..model.lm import load_state_dict_checked

    own = {plain_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    if all(plain_name(k) == k for k in model.state_dict()):
        load_state_dict_checked(model, weights, source)
        return
    problems = [f"missing {k}" for k in own if k not in weights] + [f"unexpected {k}" for k in weights if k not in own]
    problems += [f"{k}: shape {tuple(weights[k].shape)}, model expects {tuple(v.shape)}"
                 for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: {'; '.join(problems[:12])}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])
