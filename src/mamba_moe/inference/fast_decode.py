"""A lean single-token decode step over a model's weights: fewer, fused ops and optional int8 weights.

Why: a batch-1 decode step of ``mamba-moe-300m`` through the model's own forward costs about 12,800 ATen
calls, and once the weights are int8 the step is bound by them rather than by memory bandwidth. The
model's forward also computes what only training needs (router losses and statistics, a key mask
concatenated every step). This step keeps the model's modules where they are already lean (norms, the
Mamba2 mixer, whose single-token path updates its state in place, and attention) and replaces the rest:

- **MoE** layers become two matrix products per token: one over the [gate | up] rows of every routed
  expert *and* the shared expert, and one down projection over their concatenated hidden units, with
  each expert's routing weight applied to its hidden units in between (the sum over experts of
  ``w_e * down_e(h_e)`` is ``down_cat(concat(w_e * h_e))``). The soft and the top-k routers give
  their usual weights (top-k: the chosen experts' renormalised probabilities, the others 0), so top-k
  runs every expert with weight 0 for the unchosen ones: no data-dependent shapes, no host sync, so the
  step can be captured in a CUDA graph (``cuda_graphs.py``). No auxiliary losses or statistics.
- **Attention** layers are the model's module, given a preallocated key-validity mask (no concatenation).
- ``int8=True`` (CPU): every linear layer, the fused experts and the output head become int8-weight
  layers with dynamically quantized activations (fbgemm), so a 300M step reads ~0.3 GB instead of 1.2.

The model's own forward (``DecodeBatch`` without a decoder) is the reference: in float64 this step
gives the same greedy tokens and logits within 1e-10 (tests/test_inference_fast_decode.py); the int8
step is compared with the float model under a stated tolerance. Switch-routed models fall back to the
model's MoE layer (its capacity depends on the batch, so it cannot be fused the same way).
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.block import HybridBlock
from ..model.cache import HybridCache, KVState, MambaState
from ..model.ffn import MoEFeedForward
from ..model.lm import MambaMoEForCausalLM
from ..ops.rope import rope_cos_sin
from .quantize import dynamic_int8


class KeyValueStore(Protocol):
    """What an attention layer needs from its decode state: ``append`` new keys, get all keys back."""

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]: ...


def int8_linear(weight: Tensor) -> nn.Module:
    """An int8-weight (per output channel) linear layer with dynamic int8 activations (fbgemm, CPU)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.detach().float().contiguous()
    return int8_module(layer)


def int8_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose nn.Linear layers are int8 dynamic-quantized (the original is untouched)."""
    # Wrapped so a bare nn.Linear is replaced as a child of the wrapper, not in place of itself.
    return dynamic_int8(nn.Sequential(copy.deepcopy(module)))[0]


def _plain_linear(weight: Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data = weight.detach().contiguous()
    layer.requires_grad_(False)
    return layer


class FusedMoE(nn.Module):
    """A soft or top-k MoE layer (+ shared expert) as two matrix products; see the module docstring."""

    def __init__(self, moe: MoEFeedForward, int8: bool = False) -> None:
        super().__init__()
        if moe.router_kind not in ("soft", "topk"):
            raise ValueError(f"FusedMoE: router {moe.router_kind!r} cannot be fused (soft and topk can)")
        bank = moe.experts
        self.router_kind, self.top_k = moe.router_kind, moe.top_k
        self.num_experts, self.hidden, _ = bank.up_proj.shape
        self.swiglu = bank.activation == "swiglu"
        self.router_weight = moe.router.weight.detach()
        shared = moe.shared_expert
        with torch.no_grad():
            ups = [bank.up_proj.flatten(0, 1)] + ([shared.up_proj.weight] if shared is not None else [])
            downs = list(bank.down_proj.unbind(0)) + ([shared.down_proj.weight] if shared is not None else [])
            first = torch.cat(ups)
            if self.swiglu:
                gates = [bank.gate_proj.flatten(0, 1)] + ([shared.gate_proj.weight] if shared is not None else [])
                first = torch.cat([torch.cat(gates), first])
            second = torch.cat(downs, dim=1)
        self.width = second.shape[1]                      # routed hidden units + shared hidden units
        make = int8_linear if int8 else _plain_linear
        self.first, self.second = make(first), make(second)

    def routing(self, x: Tensor) -> Tensor:
        """Mixing weights (n, E) of the model's router (soft: softmax; topk: renormalised top-k)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(F.linear(x.to(dtype), self.router_weight.to(dtype)), dim=-1)
        if self.router_kind == "soft":
            return probs
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_model) -> (..., d_model)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights = self.routing(tokens).to(tokens.dtype)
        h = self.first(tokens)
        if self.swiglu:
            gate, up = h.split(self.width, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        routed = h[:, :self.num_experts * self.hidden].view(-1, self.num_experts, self.hidden)
        routed.mul_(weights[..., None])
        return self.second(h).reshape(shape)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (decode runs thousands of these per token)."""
    return t if t.dtype == dtype else t.to(dtype)


class FastNorm(nn.Module):
    """The model's RMSNorm (in >= float32, like the model's) with fewer calls."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x32 = _as(x, dtype)
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(self.eps))
        return _as(out.mul_(_as(self.weight, dtype)), x.dtype)


class FastMamba(nn.Module):
    """The single-token path of a ``Mamba2Mixer`` with its constants precomputed and the state updated in
    place (conv shift, ``state = state * decay + dt x B^T`` as two in-place passes, ``y = state C`` as one
    matrix-vector product per group).

    Same math as ``Mamba2Mixer.forward`` with a state and one token; built from the weights as they
    are (rebuild the decoder after changing them).
    """

    def __init__(self, mixer: nn.Module, int8: bool = False) -> None:
        super().__init__()
        self.in_proj = int8_linear(mixer.in_proj.weight) if int8 else mixer.in_proj
        self.out_proj = int8_linear(mixer.out_proj.weight) if int8 else mixer.out_proj
        self.d_inner, self.conv_dim, self.heads = mixer.d_inner, mixer.conv_dim, mixer.num_heads
        self.head_dim, self.groups, self.d_state = mixer.head_dim, mixer.ngroups, mixer.d_state
        with torch.no_grad():
            weight = mixer.conv1d.weight[:, 0, :]                                   # (conv_dim, K)
            self.conv_past, self.conv_now = weight[:, :-1].contiguous(), weight[:, -1].contiguous()
            self.conv_bias = mixer.conv1d.bias
            scan = torch.promote_types(weight.dtype, torch.float32)
            self.A = -torch.exp(mixer.A_log.detach().to(scan))
            self.dt_bias, self.D = mixer.dt_bias.detach().to(scan), mixer.D.detach().to(scan)
        self.norm_weight, self.norm_eps = mixer.norm.weight, mixer.norm.eps

    def forward(self, hidden: Tensor, state: MambaState) -> Tensor:
        """hidden (b, 1, d_model) -> (b, 1, d_model); ``state`` advanced by one token in place."""
        b = hidden.shape[0]
        h, p, g, n = self.heads, self.head_dim, self.groups, self.d_state
        z, xbc, dt = self.in_proj(hidden[:, 0]).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        # Causal conv over (state, new input), then shift the new input into the state.
        conv = state.conv
        if not conv.is_contiguous():  # a prefill leaves a strided slice; strided (c, 3) ops are slower
            state.conv = conv = conv.contiguous()
        y = _as((conv * _as(self.conv_past, conv.dtype)).sum(-1), xbc.dtype)
        y.addcmul_(xbc, _as(self.conv_now, xbc.dtype))
        if self.conv_bias is not None:
            y.add_(_as(self.conv_bias, y.dtype))
        conv.copy_(torch.cat([conv[..., 1:], _as(xbc, conv.dtype)[..., None]], dim=-1))
        ssm = state.ssm
        if not ssm.is_contiguous():  # once after a prefill (a strided view); updated in place from then on
            state.ssm = ssm = ssm.contiguous()
        xbc = _as(F.silu(y), ssm.dtype)
        x = xbc[:, :self.d_inner].view(b, h, p)
        B = xbc[:, self.d_inner:self.d_inner + g * n].view(b, g, 1, 1, n)
        C = xbc[:, self.d_inner + g * n:].view(b, g, 1, n, 1)
        dt = F.softplus(_as(dt, ssm.dtype) + self.dt_bias)                             # (b, h)
        grouped = ssm.view(b, g, h // g, p, n)
        grouped.mul_(torch.exp(dt * self.A).view(b, g, h // g, 1, 1))
        grouped.addcmul_((x * dt[..., None]).view(b, g, h // g, p, 1), B)
        # y = state C as one matrix-vector product per (row, group): (h/g * p, n) @ (n,). The broadcast
        # per-head form (h small (p, n) products) is ~9x slower on CPU (MKL's batched gemv).
        y = torch.bmm(ssm.view(b * g, (h // g) * p, n), C.reshape(b * g, n, 1))
        y = y.view(b, h, p).addcmul_(x, self.D[:, None]).view(b, -1)
        # Gated group RMSNorm: RMSNorm(y * silu(z)) over each group's channels.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        gated = _as(y, dtype).mul_(F.silu(_as(z, dtype))).view(b, g, -1)
        gated = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True).add_(self.norm_eps))
        normed = gated.view(b, 1, -1).mul_(_as(self.norm_weight, dtype))
        return self.out_proj(_as(normed, hidden.dtype))


class FastLayer(nn.Module):
    """One decode layer: the block's norms and mixer, and a fused MoE (or the block's own FFN)."""

    def __init__(self, block: HybridBlock, int8: bool = False) -> None:
        super().__init__()
        self.kind = block.mixer_kind
        self.mixer_norm = FastNorm(block.mixer_norm)
        if self.kind == "mamba":
            self.mixer = FastMamba(block.mixer, int8)
        else:
            self.mixer = int8_module(block.mixer) if int8 else block.mixer
        self.ffn_kind = block.ffn_kind
        self.ffn: nn.Module | None = None
        self.model_moe = False                    # True: the model's MoE layer (returns out, aux, stats)
        if block.ffn_kind != "none":
            self.ffn_norm = FastNorm(block.ffn_norm)
            if block.ffn_kind == "moe" and block.ffn.router_kind in ("soft", "topk"):
                self.ffn = FusedMoE(block.ffn, int8)
            elif block.ffn_kind == "moe":
                self.ffn, self.model_moe = block.ffn, True
            else:
                self.ffn = int8_module(block.ffn) if int8 else block.ffn

    def forward(self, hidden: Tensor, cos: Tensor | None, sin: Tensor | None, attn_mask: Tensor | None,
                state: MambaState | KeyValueStore) -> Tensor:
        x = self.mixer_norm(hidden)
        if self.kind == "mamba":
            hidden = hidden + self.mixer(x, state)
        else:
            hidden = hidden + self.mixer(x, cos, sin, attn_mask, state)
        if self.ffn is not None:
            x = self.ffn_norm(hidden)
            hidden = hidden + (self.ffn(x)[0] if self.model_moe else self.ffn(x))
        return hidden


class FastDecoder(nn.Module):
    """The decode step ``(tokens, cache) -> logits`` of ``model``, lean and optionally int8 (CPU).

    It shares the model's non-MoE weights (float mode) or holds int8 copies of its linear layers. The
    fused MoE matrices are a copy made once (float: the experts' size again, 151M parameters for
    mamba-moe-300m; int8: a quarter of that), taken at construction: rebuild it after changing the
    weights. The model's own forward still runs prefill. Use it through
    ``DecodeBatch(model, decoder=FastDecoder(model))`` or ``Engine(..., decoder="fast" | "fast-int8")``.
    """

    def __init__(self, model: MambaMoEForCausalLM, int8: bool = False) -> None:
        super().__init__()
        if int8 and (model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type != "cpu"):
            raise ValueError("FastDecoder(int8=True): int8 decoding needs a float32 model on the CPU")
        self.config = model.config
        self.int8 = int8
        self.embed = model.embed
        backbone = model.backbone
        self.layers = nn.ModuleList(FastLayer(block, int8) for block in backbone.layers)
        self.final_norm = FastNorm(backbone.final_norm)
        self.has_attention = backbone.has_attention
        if self.has_attention:
            self.rope_inv_freq = backbone.rope_inv_freq
            self.rope_factor = backbone.rope_attention_factor
        self.head = self._head(model, int8)
        self._key_valid: Tensor | None = None     # preallocated (b, capacity) bool buffer behind cache.key_mask

    @staticmethod
    def _head(model: MambaMoEForCausalLM, int8: bool) -> Any:
        if model.lm_head is not None:
            return int8_module(model.lm_head) if int8 else model.lm_head
        if not int8:
            return model.embed.logits
        table = int8_linear(model.embed.weight)
        if model.embed.proj is None:
            return table
        down = int8_linear(model.embed.proj.weight.t())     # d_model -> rank, the transpose of proj
        return lambda hidden: table(down(hidden))

    def logits(self, tokens: Tensor, positions: Tensor, key_valid: Tensor | None,
               states: list[MambaState | KeyValueStore]) -> Tensor:
        """One step for (b, 1) tokens at ``positions`` (b,); ``key_valid`` (b, t) marks the keys each row
        may see (the new one included); ``states`` per layer. Returns logits (b, V)."""
        hidden = self.embed(tokens)
        cos = sin = attn_mask = None
        if self.has_attention:
            cos, sin = rope_cos_sin(positions[:, None], self.rope_inv_freq, self.rope_factor, hidden.dtype)
            attn_mask = key_valid[:, None, None, :]
        for layer, state in zip(self.layers, states, strict=True):
            hidden = layer(hidden, cos, sin, attn_mask, state)
        return self.head(self.final_norm(hidden[:, -1]))

    def _key_mask_buffer(self, cache: HybridCache) -> Tensor:
        """cache.key_mask extended by the new position, as a view of a buffer kept across steps (the model's
        forward concatenates the whole mask every step)."""
        b, t = cache.key_mask.shape
        buf = self._key_valid
        fresh = (buf is None or buf.shape[0] != b or buf.shape[1] < t + 1 or buf.device != cache.key_mask.device
                 or cache.key_mask.data_ptr() != buf.data_ptr() or cache.key_mask.stride() != buf.stride())
        if fresh:  # the batch changed (rows joined or left) or the buffer is full: copy the mask over
            capacity = min((s.capacity for s in cache.layers if isinstance(s, KVState)), default=0)
            buf = torch.zeros(b, max(capacity, 2 * (t + 1)), dtype=torch.bool, device=cache.key_mask.device)
            buf[:, :t] = cache.key_mask
            self._key_valid = buf
        buf[:, t] = True
        cache.key_mask = buf[:, :t + 1]
        return cache.key_mask

    def forward(self, tokens: Tensor, cache: HybridCache) -> Tensor:
        """Decode (b, 1) tokens on ``cache`` (updated in place, as the model's forward does): logits (b, V)."""
        if tokens.dim() != 2 or tokens.shape != (cache.batch_size, 1):
            raise ValueError(f"tokens: expected ({cache.batch_size}, 1), got {tuple(tokens.shape)}")
        key_valid = self._key_mask_buffer(cache)
        logits = self.logits(tokens, cache.positions, key_valid, cache.layers)
        cache.positions.add_(1)
        return logits
