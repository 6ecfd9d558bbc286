"""The layer stack without embeddings: (batch, seq, d_model) -> (batch, seq, d_model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import MambaMoEConfig
from ..ops.rope import rope_cos_sin, rope_inv_freq
from ..ops.ssd import check_seq_idx
from .block import HybridBlock, LayerInputs
from .cache import HybridCache, KeyValueStore, MambaState
from .ffn import RouterStats
from .init import init_weights
from .norms import RMSNorm


@dataclass
class BackboneOutput:
    hidden: Tensor
    aux_loss: Tensor
    router_stats: list[RouterStats] = field(default_factory=list)


def check_mask(mask: Tensor | None, batch: int, seq: int, name: str = "mask") -> Tensor | None:
    """Accept a (batch, seq) bool or 0/1 tensor; return it as bool, or raise naming ``name``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.shape != (batch, seq):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a (batch, seq) = ({batch}, {seq}) tensor, got {shape}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"{name}: expected bool or integer 0/1 values, got dtype {mask.dtype}")
        mask = mask != 0
    return mask


class MambaMoEBackbone(nn.Module):
    """The hybrid stack of seed 004's API: Mamba2 / attention mixers with dense or MoE FFNs."""

    def __init__(self, config: MambaMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.has_attention = "attention" in config.layer_mixers
        if self.has_attention:
            inv_freq, self.rope_attention_factor = rope_inv_freq(config.head_dim, config.rope_theta,
                                                                 config.rope_scaling)
            self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        # Recompute each layer in backward instead of storing its activations (set by trainers; off by default).
        self.gradient_checkpointing = False
        init_weights(self, config)

    def new_cache(self, batch_size: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> HybridCache:
        device = device or self.final_norm.weight.device
        states = [layer.new_state(batch_size, device=device, dtype=dtype) for layer in self.layers]
        return HybridCache(states, batch_size, device)

    def _layer_inputs(self, hidden: Tensor, mask: Tensor | None, cache: HybridCache | None,
                      seq_idx: Tensor | None = None) -> LayerInputs:
        b, l, _ = hidden.shape
        device = hidden.device
        past = 0 if cache is None else cache.seen_tokens
        real = torch.ones(b, l, dtype=torch.bool, device=device) if mask is None else mask
        key_valid = real if cache is None else cache.extend_key_mask(real)
        if not self.has_attention:
            return LayerInputs(mask, None, None, None, seq_idx=seq_idx)

        start = cache.positions if cache is not None else torch.zeros(b, dtype=torch.long, device=device)
        # With left padding the first real token is position 0 (or continues the cache's count).
        count = torch.cumsum(real.long(), dim=1)
        if seq_idx is not None:  # positions restart at every packed document
            index = torch.arange(l, device=device).expand(b, l)
            new_doc = torch.ones_like(real)
            new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            doc_start = torch.cummax(torch.where(new_doc, index, 0), dim=1).values
            count = count - (count - real.long()).gather(1, doc_start)
        positions = (start[:, None] + count - 1).clamp(min=0)
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, self.rope_attention_factor, hidden.dtype)
        attn_mask = None
        if mask is not None or past > 0 or seq_idx is not None:
            q_index = past + torch.arange(l, device=device)
            k_index = torch.arange(past + l, device=device)
            allowed = (k_index[None, :] <= q_index[:, None])[None] & key_valid[:, None, :]
            if seq_idx is not None:  # block-diagonal: a token attends within its own document only
                allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
            # A query always sees itself, so a padded query never has an all-masked (NaN) row.
            allowed = allowed | (k_index[None, :] == q_index[:, None])[None]
            attn_mask = allowed[:, None]
        return LayerInputs(mask, cos, sin, attn_mask, seq_idx=seq_idx)

    def run(self, hidden: Tensor, mask: Tensor | None = None, cache: HybridCache | None = None,
            expert_targets: Tensor | None = None, seq_idx: Tensor | None = None,
            router_stats: bool = True) -> BackboneOutput:
        """The full forward: hidden states, the summed weighted router losses and per-layer stats.

        ``expert_targets`` (b, l) long, -1 = none: a preferred expert per token for domain-guided routing.
        ``seq_idx`` (b, l) integer, non-decreasing along a row: packed documents. Each document is
        processed exactly as if alone (attention block-diagonal, positions restarting, Mamba conv and
        state reset at its first token). Not with a cache (decode continues one document).
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.d_model:
            raise ValueError(f"x: expected (batch, seq, {self.config.d_model}), got shape {tuple(hidden.shape)}")
        if not hidden.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got dtype {hidden.dtype}")
        b, l, _ = hidden.shape
        mask = check_mask(mask, b, l)
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache: built for batch size {cache.batch_size}, called with batch size {b}")
        if seq_idx is not None:
            if cache is not None:
                raise ValueError("seq_idx: packed documents are for training/full forwards, not with a cache")
            check_seq_idx(seq_idx, b, l)
        inputs = self._layer_inputs(hidden, mask, cache, seq_idx)
        inputs.router_stats = router_stats
        if expert_targets is not None:
            if expert_targets.shape != (b, l) or expert_targets.is_floating_point():
                raise ValueError(f"expert_targets: expected a ({b}, {l}) integer tensor, got "
                                 f"{tuple(expert_targets.shape)} {expert_targets.dtype}")
            inputs.expert_targets = expert_targets
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        aux = hidden.new_zeros((), dtype=torch.float32)
        stats = []
        for i, layer in enumerate(self.layers):
            if recompute:
                hidden, layer_aux, layer_stats = checkpoint(layer, hidden, inputs, None, use_reentrant=False)
            else:
                hidden, layer_aux, layer_stats = layer(hidden, inputs, None if cache is None else cache.layers[i])
            if layer_aux is not None:
                aux = aux + layer_aux
                stats.append(layer_stats)
        if cache is not None:
            cache.positions = cache.positions + (l if mask is None else mask.sum(1))
        hidden = self.final_norm(hidden)
        if mask is not None:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        return BackboneOutput(hidden, aux, stats)

    def step(self, hidden: Tensor, positions: Tensor, key_valid: Tensor | None,
             states: list[MambaState | KeyValueStore]) -> Tensor:
        """One decode token per row: hidden (b, 1, d_model) at ``positions`` (b,) -> final-normed (b, 1, d_model).

        ``key_valid`` (b, t): the keys each row may attend to, the new one included (None without attention);
        ``states``: one per layer, advanced in place. The model's decode step (``MambaMoEForCausalLM.step``);
        equal to ``run`` on the same token with a cache, without padding handling or router statistics.
        """
        cos = sin = attn_mask = None
        if self.has_attention:
            cos, sin = rope_cos_sin(positions[:, None], self.rope_inv_freq, self.rope_attention_factor, hidden.dtype)
            attn_mask = key_valid[:, None, None, :]
        for layer, state in zip(self.layers, states, strict=True):
            hidden = layer.step(hidden, state, cos, sin, attn_mask)
        return self.final_norm(hidden)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Seed 004's call: x (batch, seq, dim), optional bool mask (True = real) -> (batch, seq, dim).

        Positions where mask is False are zero in the output and do not influence the others. The
        router losses of the last call are kept in ``self.last_aux_loss`` for training loops.
        """
        out = self.run(x, mask)
        self.last_aux_loss = out.aux_loss
        return out.hidden
