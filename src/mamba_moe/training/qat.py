"""Quantization-aware training: the weights the GGUF export quantizes are seen by the loss as quantized.

:func:`prepare_qat` registers a ``torch.nn.utils.parametrize`` parametrization on each such weight, so the
module reads ``fake_quantize(latent)`` (Q4_0 or Q8_0 values, straight-through gradient) while the
optimizer updates the latent float weight. Parametrize keeps the very same ``nn.Parameter`` object as
``<module>.parametrizations.<name>.original``, so an optimizer built before or after stays valid.

What is quantized: every ``nn.Linear`` weight inside the backbone (Mamba2 in/out projections, attention
q/k/v/o, the shared expert and dense FFN projections) and the stacked expert banks ``(E, out, in)``,
grouped along ``in`` as GGUF stores ``*_exps``. These are > 95 % of the bytes of a model and what a Q4_0
export turns into 4-bit blocks. Kept in float: norms and the Mamba ``A_log``/``D``/``dt_bias``/conv1d
(tiny, and 1-D or with rows too short for 32-blocks; llama.cpp keeps 1-D tensors in F32), the MoE router
(a few KB whose rounding would flip expert choices; kept unquantized in the export), and the token
embedding, its low-rank projection and the output head (outside the backbone; exporters keep them at
higher precision, and the tied head shares the embedding). A weight whose last dim is not a multiple of
``group_size`` is skipped and logged (ggml cannot block it either).

:func:`convert_qat` removes the parametrizations, leaving the quantized values in the same parameters;
:func:`plain_state_dict` gives the latent float weights under their plain names, so a checkpoint saved
during QAT loads with ``from_pretrained`` and resumes exactly by ``prepare_qat`` on the loaded model.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..model.ffn import ExpertBank
from ..ops.quant import check_quant_args, fake_quantize

log = logging.getLogger(__name__)

_MARK = ".parametrizations."
_KEPT_LINEARS = ("router",)  # nn.Linear children kept in float, by attribute name


class FakeQuantize(nn.Module):
    """A parametrization: weight -> fake_quantize(weight, bits, group_size)."""

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quantize(weight, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


def qat_targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full parameter name, owning module, attribute) of every weight the export quantizes."""
    root = getattr(model, "backbone", model)
    prefix = "backbone." if root is not model else ""
    targets = []
    for name, module in root.named_modules():
        dotted = prefix + (name + "." if name else "")
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in _KEPT_LINEARS:
            targets.append((dotted + "weight", module, "weight"))
        elif isinstance(module, ExpertBank):
            for attr in ("gate_proj", "up_proj", "down_proj"):
                if attr in module._parameters or (parametrize.is_parametrized(module, attr)):
                    targets.append((dotted + attr, module, attr))
    return targets


def prepare_qat(model: nn.Module, bits: int = 4, group_size: int = 32) -> list[str]:
    """Put fake quantization on the weights the export quantizes; returns their parameter names.

    Idempotent for a model that is already prepared with the same settings (nothing is stacked twice).
    """
    check_quant_args(torch.zeros(group_size), bits, group_size)  # bad bits / group size: ValueError
    names = []
    for name, module, attr in qat_targets(model):
        if parametrize.is_parametrized(module, attr):
            existing = [p for p in module.parametrizations[attr] if isinstance(p, FakeQuantize)]
            if existing and (existing[0].bits, existing[0].group_size) != (bits, group_size):
                raise ValueError(f"{name}: already prepared for QAT with bits={existing[0].bits}, "
                                 f"group_size={existing[0].group_size}; convert_qat first")
            names.append(name)
            continue
        weight = getattr(module, attr)
        if weight.shape[-1] % group_size:
            log.warning("QAT: %s of shape %s skipped: last dim not a multiple of group_size %d",
                        name, tuple(weight.shape), group_size)
            continue
        parametrize.register_parametrization(module, attr, FakeQuantize(bits, group_size))
        names.append(name)
    return names


def is_qat(model: nn.Module) -> bool:
    """True if any module of ``model`` carries a fake-quantization parametrization."""
    return any(isinstance(p, FakeQuantize) for m in model.modules() if parametrize.is_parametrized(m)
               for plist in m.parametrizations.values() for p in plist)


def convert_qat(model: nn.Module) -> None:
    """Remove the fake quantization, leaving each parameter holding its quantized values (same objects)."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            if any(isinstance(p, FakeQuantize) for p in module.parametrizations[attr]):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with ``<m>.parametrizations.<name>.original`` renamed ``<m>.<name>`` (the
    latent float weights): loadable into a plain model of the same config."""
    out = {}
    for key, value in model.state_dict().items():
        if _MARK in key and key.endswith(".original"):
            head, tail = key.split(_MARK, 1)
            key = f"{head}.{tail[: -len('.original')]}"
        out[key] = value
    return out
