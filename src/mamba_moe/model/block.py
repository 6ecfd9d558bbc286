"""One pre-norm residual layer: h += mixer(norm(h)); h += ffn(norm(h))."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import MambaMoEConfig
from .attention import Attention
from .cache import KeyValueStore, KVState, MambaState
from .ffn import FeedForward, MoEFeedForward, RouterStats
from .mamba2 import Mamba2Mixer
from .norms import RMSNorm


@dataclass
class LayerInputs:
    """What every layer of one forward call shares: the padding mask and the attention context."""

    mask: Tensor | None          # (b, l) bool, False = padding; None = no padding
    cos: Tensor | None           # RoPE tables (b, l, head_dim); None when the model has no attention
    sin: Tensor | None
    attn_mask: Tensor | None     # (b, 1, l, t) bool; None = plain causal over this chunk alone
    expert_targets: Tensor | None = None  # (b, l) long preferred expert per token, -1 = none (training only)
    seq_idx: Tensor | None = None         # (b, l) document index of packed rows; None = one document per row
    router_stats: bool = True             # False (inference): MoE layers skip their losses and statistics


class HybridBlock(nn.Module):
    def __init__(self, config: MambaMoEConfig, index: int) -> None:
        super().__init__()
        self.mixer_kind = config.layer_mixers[index]
        self.ffn_kind = config.layer_ffns[index]
        self.mixer_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mixer = Mamba2Mixer(config) if self.mixer_kind == "mamba" else Attention(config, index)
        if self.ffn_kind != "none":
            self.ffn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
            self.ffn = (MoEFeedForward(config) if self.ffn_kind == "moe"
                        else FeedForward(config.d_model, config.ffn_hidden_size, config.ffn_activation))

    def new_state(self, batch_size: int, **kwargs) -> MambaState | KVState:
        return self.mixer.new_state(batch_size, **kwargs)

    def forward(self, hidden: Tensor, inputs: LayerInputs,
                state: MambaState | KVState | None = None) -> tuple[Tensor, Tensor | None, RouterStats | None]:
        x = self.mixer_norm(hidden)
        if self.mixer_kind == "mamba":
            hidden = hidden + self.mixer(x, inputs.mask, state, inputs.seq_idx)
        else:
            hidden = hidden + self.mixer(x, inputs.cos, inputs.sin, inputs.attn_mask, state)
        aux, stats = None, None
        if self.ffn_kind == "moe":
            out, aux, stats = self.ffn(self.ffn_norm(hidden), inputs.mask, inputs.expert_targets, inputs.router_stats)
            hidden = hidden + out
        elif self.ffn_kind == "dense":
            hidden = hidden + self.ffn(self.ffn_norm(hidden))
        return hidden, aux, stats

    def step(self, hidden: Tensor, state: MambaState | KeyValueStore, cos: Tensor | None, sin: Tensor | None,
             attn_mask: Tensor | None) -> Tensor:
        """One decode token per row: hidden (b, 1, d) -> (b, 1, d); ``state`` advanced by it.

        Attention layers take the RoPE tables (b, 1, head_dim) of the token's position and ``attn_mask``
        (b, 1, 1, t), the keys the row may see (the new one included). No router losses or statistics.
        """
        x = self.mixer_norm(hidden)
        if self.mixer_kind == "mamba":
            hidden = hidden + self.mixer.step(x, state)
        else:
            hidden = hidden + self.mixer(x, cos, sin, attn_mask, state)
        if self.ffn_kind == "moe":
            hidden = hidden + self.ffn.step(self.ffn_norm(hidden))
        elif self.ffn_kind == "dense":
            hidden = hidden + self.ffn(self.ffn_norm(hidden))
        return hidden
