"""Load a Hugging Face ``Mamba2ForCausalLM`` checkpoint directory into ``MambaMoEForCausalLM``.

Our Mamba2 mixer uses HF's parameter names and shapes, so conversion is a config translation plus a
renaming of the layer norms, the embedding and the final norm. transformers itself is not needed.

Mapping (HF -> ours)::

    backbone.embeddings.weight        -> embed.weight
    backbone.layers.N.norm.weight     -> backbone.layers.N.mixer_norm.weight
    backbone.layers.N.mixer.<x>       -> backbone.layers.N.mixer.<x>
    backbone.norm_f.weight            -> backbone.final_norm.weight
    lm_head.weight                    -> lm_head.weight (untied heads only; ignored when tied)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..config import MambaMoEConfig
from ..model.lm import MambaMoEForCausalLM, load_state_dict_checked

_SAFETENSORS = "model.safetensors"
_TORCH_BIN = "pytorch_model.bin"
_LAYER_NORM = re.compile(r"backbone\.layers\.(\d+)\.norm\.weight")


def _json_float(value: Any) -> Any:
    """transformers 5 writes inf as ``{"__float__": "Infinity"}``; older versions as bare ``Infinity``."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return value


def config_from_hf(hf: dict[str, Any]) -> MambaMoEConfig:
    """Translate a HF ``Mamba2Config`` dictionary; raise ValueError naming any key we cannot represent."""
    if hf.get("model_type", "mamba2") != "mamba2":
        raise ValueError(f"model_type: expected 'mamba2', got {hf['model_type']!r}")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "head_dim"):
        if key not in hf:
            raise ValueError(f"{key}: missing from config.json (is this a HF Mamba2ForCausalLM checkpoint?)")
    if hf.get("use_bias", False):
        raise ValueError("use_bias: True is not supported (our in_proj / out_proj have no bias)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
    limit = [_json_float(v) for v in hf.get("time_step_limit", (0.0, math.inf))]
    # dt = softplus(.) > 0, so any lower limit <= 0 never clamps; an upper limit must be inf.
    if len(limit) != 2 or float(limit[0]) > 0 or float(limit[1]) != math.inf:
        raise ValueError(f"time_step_limit: only (0, inf) is supported (our model never clamps dt), "
                         f"got {hf['time_step_limit']!r}")

    d_model, expand, head_dim = hf["hidden_size"], hf.get("expand", 2), hf["head_dim"]
    if float(expand) != int(expand):
        raise ValueError(f"expand: must be an integer, got {expand!r}")
    expand = int(expand)
    if "num_heads" in hf and hf["num_heads"] * head_dim != expand * d_model:
        raise ValueError(f"num_heads: {hf['num_heads']} heads of head_dim {head_dim} do not cover "
                         f"expand * hidden_size = {expand * d_model}; need num_heads = "
                         f"{expand * d_model / head_dim:g}")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # several end tokens: we keep one, the first
        eos = eos[0] if eos else None
    n_layers = hf["num_hidden_layers"]
    return MambaMoEConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=n_layers,
        layer_mixers=["mamba"] * n_layers, layer_ffns=["none"] * n_layers,
        embedding_rank=0, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ssm_state_size=hf["state_size"], ssm_expand=expand, ssm_head_dim=head_dim,
        ssm_ngroups=hf.get("n_groups", 8), ssm_conv_kernel=hf.get("conv_kernel", 4),
        ssm_conv_bias=bool(hf.get("use_conv_bias", True)), ssm_chunk_size=hf.get("chunk_size", 256),
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos, pad_token_id=hf.get("pad_token_id"),
    )


def _read_weights(path: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of the checkpoint (single file or shards) and a description of where they came from."""
    for name, load in ((_SAFETENSORS, load_file),
                       (_TORCH_BIN, lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        if (path / name).exists():
            return load(str(path / name)), str(path / name)
        index = path / (name + ".index.json")
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                if not (path / shard).exists():
                    raise FileNotFoundError(f"{path / shard}: shard listed in {index} is missing")
                state.update(load(str(path / shard)))
            return state, str(index)
    raise FileNotFoundError(f"{path}: no weights found; expected {_SAFETENSORS}, {_SAFETENSORS}.index.json, "
                            f"{_TORCH_BIN} or {_TORCH_BIN}.index.json")


def _rename(key: str, tied: bool) -> str | None:
    """Our name for a HF tensor name, or None for one we drop (a tied lm_head)."""
    if key in ("backbone.embeddings.weight", "backbone.embedding.weight"):  # the latter: older checkpoints
        return "embed.weight"
    if key == "backbone.norm_f.weight":
        return "backbone.final_norm.weight"
    if key == "lm_head.weight":
        return None if tied else key
    match = _LAYER_NORM.fullmatch(key)
    if match:
        return f"backbone.layers.{match.group(1)}.mixer_norm.weight"
    return key  # backbone.layers.N.mixer.* keeps its name; anything else is reported by the loader


def load_hf_mamba2(path: str | os.PathLike, dtype: torch.dtype | None = None) -> MambaMoEForCausalLM:
    """Build our model from a HF Mamba2ForCausalLM directory (config.json + safetensors or .bin weights).

    The model is built in float32 and cast to ``dtype`` when given.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a HF Mamba2ForCausalLM checkpoint "
                                "directory")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; a HF checkpoint directory needs "
                                "config.json")
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    state, source = _read_weights(path)
    renamed = {}
    for key, tensor in state.items():
        new = _rename(key, config.tie_word_embeddings)
        if new is not None:
            renamed[new] = tensor
    model = MambaMoEForCausalLM(config)
    load_state_dict_checked(model, renamed, source)
    return model.to(dtype) if dtype is not None else model
