"""Int8 weights for CPU decoding (experimental, opt-in): ~3x fewer bytes read per token than float32.

Batch-1 decode on a CPU is bound by memory bandwidth: every step reads every active weight once, so a
float32 300M model moves 1.2 GB per token. Here ``nn.Linear`` layers become int8-weight layers (per output
channel) with dynamically quantized int8 activations, using PyTorch's fbgemm kernels; routers, norms, the
convolution and the SSM parameters stay in float. Output changes slightly (rounding), so greedy text can
differ from the float model's; check the quality of a trained model (perplexity) before relying on it.

It is a weight transform applied from outside the model: modules are swapped, the model's code runs as
it is. Expert banks are first packed into two linear layers (``model.ffn.PackedExperts``), which are then
quantized like any other linear layer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...model.ffn import MoEFeedForward
from ...model.lm import MambaMoEForCausalLM


def dynamic_int8(module: nn.Module) -> nn.Module:
    """``module`` with its nn.Linear layers replaced by int8 dynamic-quantized ones (per-channel weights)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("int8 decoding needs PyTorch's fbgemm quantized engine (x86 CPUs)")
    with warnings.catch_warnings():  # torch.ao.quantization warns that it is moving to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = "fbgemm"
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def quantize_linears(model: MambaMoEForCausalLM) -> None:
    """Replace, in place, every ``nn.Linear`` of ``model`` except the MoE routers by its int8 twin.

    Routers stay in float: the MoE layer reads ``router.weight`` directly, and they are tiny. The
    embedding table (a lookup) is untouched; a head that should be int8 must be an ``nn.Linear`` module.
    """
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoEFeedForward)}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and id(child) not in routers:
                # Wrapped so a bare nn.Linear is replaced as a child of the wrapper, not in place of itself.
                setattr(module, name, dynamic_int8(nn.Sequential(child))[0])


def quantize_int8(model: MambaMoEForCausalLM) -> MambaMoEForCausalLM:
    """Convert ``model`` (float32, CPU) in place for int8 inference, prefill included; returns it.

    Packed experts compute every expert for every token (zero weight for the unchosen ones), so a top-k
    model's prefill does E / k times its usual expert work; decode is bound by weight reads either way.
    """
    from .fast_decode import decode_model  # fast_decode imports this module

    return decode_model(model, int8=True, copy_modules=False)
