"""LoRA adapters through PEFT, by our module names, with expert-wise LoRA for the stacked expert weights.

Targets (``LoraSettings.targets``) are the names of our layers:

=================  ==================================================================================
``in_proj``        Mamba2 input projection             (nn.Linear: PEFT ``lora.Linear``)
``out_proj``       Mamba2 output projection
``q_proj`` ...     attention ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
``gate_proj``      dense FFN and shared-expert projections ``gate_proj``, ``up_proj``, ``down_proj``
``experts``        every MoE layer's stacked expert weights (E, out, in): ``experts.gate_proj``,
                   ``experts.up_proj``, ``experts.down_proj`` (or name one of those alone)
=================  ==================================================================================

The stacked expert weights are ``nn.Parameter``s, not modules; PEFT adapts them with
``LoraConfig(target_parameters=...)`` (tested with peft 0.21): its ``ParamWrapper`` holds a rank-r pair per expert
(``lora_A``: (E r, in), ``lora_B``: (out, E r)) and adds ``B_e A_e`` to expert e's matrix through a
``torch.nn.utils.parametrize`` parametrisation that is active while the wrapped module's ``forward`` runs.
Our ``ExpertBank`` is used through its methods (``mix_soft``, ``mix_sparse``, ``mix_grouped``) rather than
``forward``, so :func:`apply_lora` makes the outermost wrapper route those methods through PEFT's forward
(``_ExpertLora``) and the bank answer a method name in ``forward`` (``_LoraExpertBank``): the adapted weights
are exactly PEFT's, in PEFT's state-dict layout. A shared expert with adapted projections is called as a
module after the routed mixture (``_LoraMoE``) instead of being fused into it (the fused path reads the raw
weights). The router is never a target: it reads its weight directly, and LoRA of an E x d matrix saves
nothing.

Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``; ``peft.PeftModel.from_pretrained`` reads the Linear ones) plus
``mamba_moe_base.json``, the base's config and a fingerprint of its weights, so that loading an adapter on
another base is an error naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_directory
from ..model.ffn import ExpertBank, MoEFeedForward
from ..validation import build_dataclass, check_bool, check_int, check_number, suggestion
from .common import GrowthError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_INFO = "mamba_moe_base.json"
_PREFIX = "base_model.model."
_ADAPTER = "default"

# target name -> module paths relative to a layer (nn.Linear targets)
_MODULE_TARGETS = {
    "in_proj": ("mixer.in_proj",), "out_proj": ("mixer.out_proj",),
    "q_proj": ("mixer.q_proj",), "k_proj": ("mixer.k_proj",), "v_proj": ("mixer.v_proj",),
    "o_proj": ("mixer.o_proj",),
    "gate_proj": ("ffn.gate_proj", "ffn.shared_expert.gate_proj"),
    "up_proj": ("ffn.up_proj", "ffn.shared_expert.up_proj"),
    "down_proj": ("ffn.down_proj", "ffn.shared_expert.down_proj"),
}
# target name -> parameter paths relative to a layer (stacked expert weights)
_PARAM_TARGETS = {
    "experts": ("ffn.experts.gate_proj", "ffn.experts.up_proj", "ffn.experts.down_proj"),
    "experts.gate_proj": ("ffn.experts.gate_proj",), "experts.up_proj": ("ffn.experts.up_proj",),
    "experts.down_proj": ("ffn.experts.down_proj",),
}
TARGETS = tuple(_MODULE_TARGETS) + tuple(_PARAM_TARGETS)


@dataclass
class LoraSettings:
    """What to adapt and how: the trainer's ``lora:`` section maps onto these fields one to one.

    ``rank``/``alpha``: the update is ``(alpha / rank) B A`` (``alpha / sqrt(rank)`` with ``rslora``).
    ``targets``: names from :data:`TARGETS`. ``layers``: layer indices to adapt (None = all).
    ``dropout``: on the LoRA input of Linear targets; PEFT's parameter LoRA (``experts``) has none, so
    dropout > 0 with an expert target is refused.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj",
                                                        "o_proj"])
    layers: list[int] | None = None
    rslora: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "lora") -> None:
        check_int(f"{where}.rank", self.rank, minimum=1)
        check_number(f"{where}.alpha", self.alpha, minimum=0, min_open=True)
        check_number(f"{where}.dropout", self.dropout, minimum=0, maximum=1, max_open=True)
        check_bool(f"{where}.rslora", self.rslora)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not isinstance(self.targets, list) or not self.targets:
            raise GrowthError(f"{where}.targets: give a non-empty list of module names from {list(TARGETS)}")
        for i, name in enumerate(self.targets):
            if name not in TARGETS:
                raise GrowthError(f"{where}.targets[{i}]: {name!r} is not a LoRA target{suggestion(name, TARGETS)} "
                                  f"(known: {', '.join(TARGETS)}; the router is never adapted)")
        if self.dropout and any(t in _PARAM_TARGETS for t in self.targets):
            raise GrowthError(f"{where}.dropout: PEFT's LoRA of the stacked expert weights has no dropout (the "
                              "input cannot be factored out); set it to 0 or drop the expert targets")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not self.layers:
                raise GrowthError(f"{where}.layers: a non-empty list of layer indices, or null for every layer")
            for i, index in enumerate(self.layers):
                check_int(f"{where}.layers[{i}]", index, minimum=0)

    @classmethod
    def from_dict(cls, data: Any, where: str = "lora") -> LoraSettings:
        return build_dataclass(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "layers": None if self.layers is None else list(self.layers), "rslora": self.rslora}


# ---- PEFT glue for our method-called modules -----------------------------------------------------------

def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise GrowthError("lora: needs the peft package (pip install 'mamba-moe[growth]')") from err
    return peft


class _LoraExpertBank(ExpertBank):
    """An ExpertBank whose ``forward(method, *args)`` runs that method: PEFT's ParamWrapper activates the
    adapted weights around ``forward`` calls only."""

    def forward(self, method: str, *args: Any) -> Tensor:
        return getattr(ExpertBank, method)(self, *args)


def _expert_wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    class _ExpertLora(ParamWrapper):
        """The outermost ParamWrapper of an ExpertBank: its methods go through PEFT's forward, which applies
        every nested wrapper's adapted weight, then reach the bank's method."""

        @property
        def activation(self) -> str:
            return self.get_base_layer().activation

        def mix_soft(self, x: Tensor, weights: Tensor, shared: nn.Module | None = None) -> Tensor:
            out = self("mix_soft", x, weights, None)
            return out if shared is None else out + shared(x)

        def mix_sparse(self, x: Tensor, weights: Tensor) -> Tensor:
            return self("mix_sparse", x, weights)

        def mix_grouped(self, x: Tensor, weights: Tensor, top_k: int, impl: str | None = None) -> Tensor:
            return self("mix_grouped", x, weights, top_k, impl)

        def all_experts(self, x: Tensor) -> Tensor:
            return self("all_experts", x)

        def expert(self, e: int, x: Tensor) -> Tensor:
            return self("expert", e, x)

    return _ExpertLora


class _LoraMoE(MoEFeedForward):
    """MoE layer whose shared expert is adapted: the soft path's fused wide MLP reads the shared expert's
    raw weights, so the shared expert is called as a module (same sum, LoRA included)."""

    def _dispatch(self, tokens: Tensor, weights: Tensor) -> Tensor:
        if self.router_kind == "soft" and self.shared_expert is not None:
            return self.experts.mix_soft(tokens, weights, None) + self.shared_expert(tokens)
        return super()._dispatch(tokens, weights)


def _is_tuner(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _adapt_method_calls(model: nn.Module) -> None:
    """After injection: expert wrappers take method calls, adapted shared experts leave the fused path."""
    from peft.tuners.lora.layer import ParamWrapper

    wrapper_cls = _expert_wrapper_class()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            if isinstance(module.experts, ParamWrapper):
                module.experts.__class__ = wrapper_cls
                module.experts.get_base_layer().__class__ = _LoraExpertBank
            shared = module.shared_expert
            if shared is not None and any(_is_tuner(m) for m in shared.modules()):
                module.__class__ = _LoraMoE


def _restore_classes(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is _LoraMoE:
            module.__class__ = MoEFeedForward
        elif type(module) is _LoraExpertBank:
            module.__class__ = ExpertBank


# ---- base fingerprint ----------------------------------------------------------------------------------

def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the base's tensor names, shapes and values rounded to bfloat16 (the same for the base loaded in
    float32, float64 or bfloat16), so an adapter is applied to the weights it was trained on."""
    if has_lora(model):
        raise GrowthError("lora: the fingerprint is of the base model; this one already has adapters")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_floating_point():
            digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        else:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def has_lora(model: nn.Module) -> bool:
    return any(_is_tuner(m) for m in model.modules())


# ---- apply / save / load / merge -----------------------------------------------------------------------

def _resolve_targets(model: nn.Module, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """Full names of the Linear modules and the stacked parameters ``settings`` adapts in ``model``."""
    config = model.config
    layers = list(range(config.n_layers)) if settings.layers is None else settings.layers
    for i, index in enumerate(layers):
        if index >= config.n_layers:
            raise GrowthError(f"lora.layers[{i}]: layer {index} out of range (the model has "
                              f"n_layers={config.n_layers})")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    module_names: list[str] = []
    param_names: list[str] = []
    for t, target in enumerate(settings.targets):
        found = []
        for layer in layers:
            if target in _MODULE_TARGETS:
                found += [f"backbone.layers.{layer}.{p}" for p in _MODULE_TARGETS[target]
                          if isinstance(modules.get(f"backbone.layers.{layer}.{p}"), nn.Linear)]
            else:
                found += [f"backbone.layers.{layer}.{p}" for p in _PARAM_TARGETS[target]
                          if f"backbone.layers.{layer}.{p}" in params]
        if not found:
            where = "the adapted layers" if settings.layers is not None else "the model"
            raise GrowthError(f"lora.targets[{t}]: {target!r} matches nothing in {where} (layer_mixers="
                              f"{[config.layer_mixers[i] for i in layers]}, layer_ffns="
                              f"{[config.layer_ffns[i] for i in layers]})")
        (module_names if target in _MODULE_TARGETS else param_names).extend(found)
    return sorted(set(module_names)), sorted(set(param_names))


def _lora_config(settings: LoraSettings, modules: list[str], params: list[str], base: str | None) -> Any:
    peft = _peft()
    return peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           use_rslora=settings.rslora, bias="none", target_modules=modules,
                           target_parameters=params or None, base_model_name_or_path=base)


def _freeze_base(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def apply_lora(model: nn.Module, settings: LoraSettings, base_path: str | os.PathLike | None = None) -> nn.Module:
    """Add fresh LoRA adapters to ``model`` in place and return it; only adapter parameters train afterwards.

    The model stays a ``MambaMoEForCausalLM`` (same forward, same config); PEFT's layers replace the targeted
    modules. ``lora_B`` starts at zero, so the output is unchanged until training moves it. ``base_path`` is
    recorded in the adapter's config (``base_model_name_or_path``).
    """
    if has_lora(model):
        raise GrowthError("lora: the model already has adapters (merge them with merge_lora first)")
    modules, params = _resolve_targets(model, settings)
    fingerprint = base_fingerprint(model)
    peft = _peft()
    peft_config = _lora_config(settings, modules, params, None if base_path is None else str(base_path))
    peft.inject_adapter_in_model(peft_config, model, adapter_name=_ADAPTER)
    _adapt_method_calls(model)
    _freeze_base(model)
    model._mamba_moe_lora = {"settings": settings, "peft_config": peft_config, "fingerprint": fingerprint,
                             "base_config": model.config.to_dict()}
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters (what an optimizer over a LoRA run holds)."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's saved names (``base_model.model.<module>.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    info = _lora_info(model)
    model.peft_config = {_ADAPTER: info["peft_config"]}
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER, save_embedding_layers=False)
    return {_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def _lora_info(model: nn.Module) -> dict[str, Any]:
    info = getattr(model, "_mamba_moe_lora", None)
    if info is None or not has_lora(model):
        raise GrowthError("lora: the model has no adapter (apply_lora or load_lora first)")
    return info


def write_lora_files(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter's files (PEFT's two + ``mamba_moe_base.json``) into the existing ``directory``, as
    they are: the caller makes the directory appear whole (``save_lora``, or a trainer checkpoint)."""
    info = _lora_info(model)
    directory = Path(directory)
    state = lora_state_dict(model)
    info["peft_config"].save_pretrained(str(directory))
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    settings = info["settings"].to_dict() if info["settings"] is not None else None
    (directory / BASE_INFO).write_text(json.dumps({"fingerprint": info["fingerprint"], "settings": settings,
                                                   "base_config": info["base_config"]}, indent=2) + "\n")


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter in PEFT's format to directory ``path`` (atomically: whole or not at all)."""
    _lora_info(model)
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_lora_files(model, tmp)
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a PEFT adapter (a ``save_lora`` directory, or a LoRA run's checkpoint)."""
    return all((Path(path) / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def read_base_info(path: str | os.PathLike) -> dict[str, Any]:
    """``mamba_moe_base.json`` of an adapter directory (empty for an adapter written by stock PEFT)."""
    file = Path(path) / BASE_INFO
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GrowthError(f"adapter: {file} cannot be read ({err}); the adapter directory is damaged") from None
    if not isinstance(data, dict):
        raise GrowthError(f"adapter: {file} is not a base record (expected a JSON object)")
    return data


def _check_base(model: nn.Module, path: Path, saved: dict[str, Any], fingerprint: str | None) -> None:
    """The config must match field by field; the weights' fingerprint too unless ``fingerprint`` is None."""
    have = model.config.to_dict()
    for name, value in saved.get("base_config", {}).items():
        if have.get(name) != value:
            raise GrowthError(f"base: the adapter {path} was trained on a base with {name}={value!r}, this base has "
                              f"{name}={have.get(name)!r}")
    if fingerprint is not None and saved.get("fingerprint") not in (None, fingerprint):
        raise GrowthError(f"base: the adapter {path} was trained on other weights (base fingerprint "
                          f"{saved['fingerprint'][:12]}..., this base {fingerprint[:12]}...); load the checkpoint "
                          "it was trained from, or pass check_base=False (--no-base-check)")


def load_lora(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Add the saved adapter at ``path`` to ``model`` (in place; returned), after checking that ``model`` is the
    base it was trained on (config and weight fingerprint; ``check_base=False`` skips the fingerprint)."""
    peft = _peft()
    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise GrowthError(f"adapter: {path / name} is missing; a PEFT adapter directory holds "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if has_lora(model):
        raise GrowthError("lora: the model already has adapters (merge them with merge_lora first)")
    saved = read_base_info(path)
    fingerprint = base_fingerprint(model)
    _check_base(model, path, saved, fingerprint if check_base else None)
    peft_config = peft.LoraConfig.from_pretrained(str(path))
    if getattr(peft_config, "peft_type", None) != peft.PeftType.LORA:
        raise GrowthError(f"adapter: {path} is a {peft_config.peft_type} adapter, not LoRA")
    state = load_file(str(path / ADAPTER_WEIGHTS))
    try:
        peft.inject_adapter_in_model(peft_config, model, adapter_name=_ADAPTER)
    except ValueError as err:
        raise GrowthError(f"adapter: {path} does not fit this base: {err}") from None
    _adapt_method_calls(model)
    problems = _copy_adapter_tensors(model, state)
    if problems:
        _unload(model, merge=False)
        raise GrowthError(f"adapter: {path / ADAPTER_WEIGHTS} does not fit this base: {'; '.join(problems[:8])}")
    _freeze_base(model)
    settings = LoraSettings.from_dict(saved["settings"]) if "settings" in saved else None
    model._mamba_moe_lora = {"settings": settings, "peft_config": peft_config, "fingerprint": fingerprint,
                             "base_config": model.config.to_dict()}
    return model


def _copy_adapter_tensors(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Copy the saved adapter ``state`` (PEFT's saved names) into ``model``'s adapter parameters in place (so an
    optimizer holding them keeps them); nothing is copied, and the mismatches are returned, when it does not fit."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if "lora_" in k}
    want = {_PREFIX + k.replace(f".{_ADAPTER}.", ".", 1): k for k in own}
    problems = [f"missing {k}" for k in want if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want]
    problems += [f"{k}: shape {tuple(state[k].shape)}, base expects {tuple(own[want[k]].shape)}"
                 for k in want if k in state and state[k].shape != own[want[k]].shape]
    if not problems:
        with torch.no_grad():
            for key, name in want.items():
                own[name].copy_(state[key])
    return problems


def restore_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter tensors saved at ``path`` into the adapters ``model`` already has (``apply_lora`` with
    the same settings, on the same base): an exact resume of a LoRA run. The base must be the one the adapter
    was trained on (fingerprint) and the settings the saved ones; each difference is an error naming it."""
    info = _lora_info(model)
    path = Path(path)
    if not is_adapter_dir(path):
        raise GrowthError(f"adapter: {path} holds no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}")
    saved = read_base_info(path)
    _check_base(model, path, saved, info["fingerprint"])
    if info["settings"] is not None and saved.get("settings") not in (None, info["settings"].to_dict()):
        have, was = info["settings"].to_dict(), saved["settings"]
        name = (next((k for k in have if have[k] != was.get(k)), None)
                or next(k for k in was if k not in have))   # a field this version no longer has
        raise GrowthError(f"lora.{name}: the adapter {path} was trained with {name}={was.get(name)!r}, this run "
                          f"has {have.get(name)!r}; keep the lora section as it was to resume")
    problems = _copy_adapter_tensors(model, load_file(str(path / ADAPTER_WEIGHTS)))
    if problems:
        raise GrowthError(f"adapter: {path / ADAPTER_WEIGHTS} does not fit this model's adapters: "
                          f"{'; '.join(problems[:8])}")
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (a deep copy, adapter folded in by :func:`merge_lora`); ``model`` keeps its adapters."""
    import copy

    _lora_info(model)
    return merge_lora(copy.deepcopy(model))


def _unload(model: nn.Module, merge: bool) -> None:
    """Replace every PEFT layer by its base layer, folding the adapter in first when ``merge``."""
    names = [name for name, m in model.named_modules() if _is_tuner(m)]
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in outer:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        with torch.no_grad():
            if hasattr(layer, "unload_and_optionally_merge_module"):  # nested ParamWrappers merge all levels
                base = layer.unload_and_optionally_merge_module(merge=merge, safe_merge=merge, adapter_names=None)
            else:
                if merge:
                    layer.merge(safe_merge=True)
                base = layer.get_base_layer()
        setattr(parent, child, base)
    _restore_classes(model)
    for attr in ("peft_config", "_mamba_moe_lora"):
        if hasattr(model, attr):
            delattr(model, attr)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights (W + scaling B A, per expert for stacked weights) and remove
    PEFT's layers: the result is a plain model whose logits equal the adapted model's. In place; returned."""
    _lora_info(model)
    _unload(model, merge=True)
    for param in model.parameters():
        param.requires_grad_(True)
    return model
