"""Int8 weights for CPU decoding (experimental, opt-in): ~3x fewer bytes read per token than float32.

Batch-1 decode on a CPU is bound by memory bandwidth: every step reads every active weight once, so a
float32 300M model moves 1.2 GB per token. This converts the backbone's linear layers and expert banks
to int8 weights (per output channel) with dynamically quantized int8 activations, using PyTorch's
fbgemm kernels; the embedding/head, routers, norms, convolution and SSM parameters stay in float.
Output changes slightly (rounding), so greedy text can differ from the float model's; check the
quality of a trained model (perplexity) before relying on it.

It is applied from outside the model: ``nn.Linear`` modules are swapped for their dynamic-quantized
peers and each ``ExpertBank`` for an ``Int8ExpertBank`` with the same calls (``expert``, ``mix_sparse``,
``all_experts``, ``mix_soft``, ``mix_grouped``): a new ExpertBank method used by the MoE layer needs its
int8 twin here.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.ffn import ExpertBank
from ..model.lm import MambaMoEForCausalLM


def dynamic_int8(module: nn.Module) -> nn.Module:
    """``module`` with its nn.Linear layers replaced by int8 dynamic-quantized ones (per-channel weights)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("int8 decoding needs PyTorch's fbgemm quantized engine (x86 CPUs)")
    with warnings.catch_warnings():  # torch.ao.quantization warns that it is moving to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = "fbgemm"
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


class Int8ExpertBank(nn.Module):
    """An ExpertBank whose experts are int8 linears.

    ``all_experts`` (the soft router's call) runs the gate and up projections of all experts as one
    fused linear, then each expert's down projection; ``expert`` (top-k / Switch) runs one expert alone.
    """

    def __init__(self, bank: ExpertBank, fused: bool) -> None:
        super().__init__()
        self.activation = bank.activation
        self.num_experts, self.hidden, d_model = bank.up_proj.shape
        swiglu = self.activation == "swiglu"

        def linear(weights: list[Tensor]) -> nn.Linear:
            layer = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False)
            layer.weight.data = torch.cat(weights).detach().float()
            return layer

        def gate_up(e: int) -> list[Tensor]:
            return [bank.gate_proj[e], bank.up_proj[e]] if swiglu else [bank.up_proj[e]]

        layers = nn.ModuleDict({"down": nn.ModuleList(linear([bank.down_proj[e]]) for e in range(self.num_experts))})
        if fused:
            layers["gate_up_all"] = linear([w for e in range(self.num_experts) for w in gate_up(e)])
        else:
            layers["gate_up"] = nn.ModuleList(linear(gate_up(e)) for e in range(self.num_experts))
        self.layers = dynamic_int8(layers)

    def _hidden(self, h: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = h.split(self.hidden, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e applied to tokens x (n, d_model)."""
        if "gate_up" in self.layers:
            h = self.layers["gate_up"][e](x.float())
        else:
            width = (2 if self.activation == "swiglu" else 1) * self.hidden
            h = self.layers["gate_up_all"](x.float())[:, e * width:(e + 1) * width]
        return self.layers["down"][e](self._hidden(h)).to(x.dtype)

    def mix_sparse(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[:, e] * expert_e(x), each expert run only on its tokens (top-k / Switch)."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            idx = weights[:, e].nonzero().squeeze(-1)
            if idx.numel():
                out.index_add_(0, idx, self.expert(e, x[idx]) * weights[idx, e, None].to(x.dtype))
        return out

    def mix_soft(self, x: Tensor, weights: Tensor, shared: nn.Module | None = None) -> Tensor:
        """sum_e weights[:, e] * expert_e(x) (+ ``shared``(x)) for dense weights (n, E): the soft router's call."""
        out = torch.einsum("ned,ne->nd", self.all_experts(x), weights.to(x.dtype))
        return out if shared is None else out + shared(x)

    def mix_grouped(self, x: Tensor, weights: Tensor, top_k: int, impl: str | None = None) -> Tensor:
        """The grouped top-k dispatch's call; int8 runs it as ``mix_sparse`` (same sum)."""
        return self.mix_sparse(x, weights)

    def all_experts(self, x: Tensor) -> Tensor:
        """Every expert on every token: (n, d_model) -> (n, E, d_model)."""
        if "gate_up_all" not in self.layers:
            return torch.stack([self.expert(e, x) for e in range(self.num_experts)], dim=1)
        h = self.layers["gate_up_all"](x.float()).view(x.shape[0], self.num_experts, -1)
        h = self._hidden(h)
        return torch.stack([self.layers["down"][e](h[:, e]) for e in range(self.num_experts)], dim=1).to(x.dtype)


def quantize_int8(model: MambaMoEForCausalLM) -> MambaMoEForCausalLM:
    """Convert ``model`` (float32, CPU) in place for int8 decoding; returns it. Inference only."""
    if model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type != "cpu":
        raise ValueError("quantize: int8 decoding needs a float32 model on the CPU")
    model.eval()
    fused = model.config.moe_router == "soft"   # the soft router runs every expert on every token
    for module in list(model.backbone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ExpertBank):
                setattr(module, name, Int8ExpertBank(child, fused))
    # Routers stay in float: the MoE layer reads router.weight directly, and they are tiny.
    routers = {id(m.router) for m in model.backbone.modules() if hasattr(m, "router")}
    for module in list(model.backbone.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and id(child) not in routers:
                setattr(module, name, dynamic_int8(nn.Sequential(child))[0])
    return model
