"""The causal language model: embeddings, the hybrid backbone and a (tied) output head."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_file
from ..config import MambaMoEConfig
from ..ops.cross_entropy import IGNORE_INDEX, lm_cross_entropy
from .backbone import MambaMoEBackbone, check_mask
from .cache import HybridCache, KeyValueStore, MambaState
from .embedding import TokenEmbedding
from .ffn import RouterStats
from .init import init_weights
from .params import count_parameters

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class CausalLMOutput:
    logits: Tensor | None              # None when the loss was asked for without logits
    loss: Tensor | None = None         # the language-model loss alone
    aux_loss: Tensor | None = None     # router losses, already weighted by the config's coefficients
    router_stats: list[RouterStats] = field(default_factory=list)


class MambaMoEForCausalLM(nn.Module):
    def __init__(self, config: MambaMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config.d_model, config.embedding_rank)
        self.backbone = MambaMoEBackbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self.embed, config)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, config.initializer_range)

    # ---- forward --------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = (f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}" if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids: expected a (batch, seq) integer tensor, got {got}")
        if input_ids.device.type == "cpu" and input_ids.numel():  # a GPU check would cost a sync per call
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), "
                                 f"got values in [{low}, {high}]")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                cache: HybridCache | None = None, targets: Tensor | None = None,
                expert_targets: Tensor | None = None, return_logits: bool = True,
                document_ids: Tensor | None = None, logits_to_keep: int = 0,
                router_stats: bool = True) -> CausalLMOutput:
        """Logits for every position, and the LM loss when ``labels`` or ``targets`` are given.

        - ``labels`` (b, l): HF convention, shifted inside (position t predicts labels[t + 1]); -100 ignored.
        - ``targets`` (b, l): already aligned (position t predicts targets[t]); -100 ignored. With
          ``return_logits=False`` the loss is computed in chunks and the full logits never exist
          (``logits`` is None): what long training batches want.
        - ``expert_targets`` (b, l) long: a preferred routed expert per token (-1 = none) for the optional
          domain-guided routing loss; each MoE layer reports it as ``RouterStats.domain_loss``.
        - ``cache`` (from ``new_cache``): successive calls continue the same sequences.
        - ``document_ids`` (b, l) integer, non-decreasing along each row: packed documents, each computed
          exactly as if it were alone in its row (no attention, conv or state across a boundary;
          positions restart). Targets across a boundary are the caller's to mask.
        - ``logits_to_keep`` n > 0: logits of the last n positions only (b, n, V) (HF's convention; 0 = all):
          a prefill needs the last one, and the head over a whole prompt is the largest product of the call.
        - ``router_stats=False``: no router losses or statistics (inference; ``aux_loss`` is 0).
        """
        self._check_ids(input_ids)
        b, l = input_ids.shape
        attention_mask = check_mask(attention_mask, b, l, "attention_mask")
        if labels is not None and targets is not None:
            raise ValueError("labels and targets: give one of them, not both")
        for name, value in (("labels", labels), ("targets", targets), ("expert_targets", expert_targets),
                            ("document_ids", document_ids)):
            if value is not None and value.shape != input_ids.shape:
                raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids, "
                                 f"got {tuple(value.shape)}")
        if expert_targets is not None and expert_targets.device.type == "cpu" and expert_targets.numel():
            n = self.config.moe_num_experts
            if int(expert_targets.min()) < -1 or int(expert_targets.max()) >= n:
                raise ValueError(f"expert_targets: values must be -1 (none) or an expert index in [0, {n}), got "
                                 f"[{int(expert_targets.min())}, {int(expert_targets.max())}]")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep: expected an integer >= 0 (0 = all positions), got {logits_to_keep!r}")
        if logits_to_keep and (labels is not None or targets is not None):
            raise ValueError("logits_to_keep: the loss needs the logits of every position; give one or the other")
        if not return_logits and labels is None and targets is None:
            raise ValueError("return_logits=False needs labels or targets (there would be nothing to return)")
        out = self.backbone.run(self.embed(input_ids), attention_mask, cache, expert_targets=expert_targets,
                                seq_idx=document_ids, router_stats=router_stats)
        if labels is not None:  # to the aligned form: position t predicts labels[t + 1]; padding is no target
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask, IGNORE_INDEX)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if targets is not None and attention_mask is not None:  # a padded position predicts nothing
            targets = targets.masked_fill(~attention_mask, IGNORE_INDEX)
        hidden = out.hidden[:, -logits_to_keep:] if logits_to_keep else out.hidden
        logits = self.head(hidden) if return_logits else None
        loss = None
        if targets is not None:
            if logits is not None:
                loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                                       targets.flatten(), ignore_index=IGNORE_INDEX)
            else:
                loss = lm_cross_entropy(out.hidden.flatten(0, 1), self.head, targets.flatten())
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=out.aux_loss, router_stats=out.router_stats)

    # ---- decoding -------------------------------------------------------------------------------
    def step(self, input_ids: Tensor, positions: Tensor, key_valid: Tensor | None,
             states: list[MambaState | KeyValueStore]) -> Tensor:
        """The decode step on explicit state: input_ids (b, 1) at ``positions`` (b,) -> logits (b, V).

        ``key_valid`` (b, t) marks the keys each row may see, the new one included (None without attention);
        ``states`` per layer are advanced in place. No checks and no host sync, so it can be captured in a
        CUDA graph (``inference.decoders.cuda_graphs``); ``decode`` is the same step on a ``HybridCache``.
        """
        hidden = self.backbone.step(self.embed(input_ids), positions, key_valid, states)
        return self.head(hidden[:, -1])

    def decode(self, input_ids: Tensor, cache: HybridCache) -> Tensor:
        """One token per row on ``cache`` (advanced in place): input_ids (b, 1) -> logits (b, V).

        Equals ``self(input_ids, cache=cache).logits[:, -1]`` (the tests compare them in float64) with
        fewer operations: no router statistics, the key mask written into its preallocated buffer.
        """
        if not isinstance(input_ids, Tensor) or input_ids.shape != (cache.batch_size, 1):
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected ({cache.batch_size}, 1) for this cache, got {got}")
        key_valid = cache.extend_key_mask()  # kept even without attention: the cache counts its tokens
        logits = self.step(input_ids, cache.positions, key_valid if self.backbone.has_attention else None,
                           cache.layers)
        cache.positions = cache.positions + 1
        return logits

    def head(self, hidden: Tensor) -> Tensor:
        """The output head: hidden (..., d_model) -> logits (..., vocab)."""
        return self.embed.logits(hidden) if self.lm_head is None else self.lm_head(hidden)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward (less memory, about a third more compute)."""
        self.backbone.gradient_checkpointing = enabled

    def new_cache(self, batch_size: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> HybridCache:
        """An empty decode state for ``batch_size`` sequences."""
        return self.backbone.new_cache(batch_size, device=device, dtype=dtype)

    # ---- accounting -------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or (``active=True``) those one token uses: unchosen routed experts excluded."""
        table = count_parameters(self)
        return sum(row.active if active else row.total for row in table)

    # ---- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json``; each file appears whole or not at all."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_file(path / WEIGHTS_NAME) as tmp:  # fsync'ed before the rename
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        self.config.save(path / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> MambaMoEForCausalLM:
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path / name}: missing; a checkpoint directory needs "
                                        f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        config = MambaMoEConfig.load(path / CONFIG_NAME)
        model = cls(config)
        load_state_dict_checked(model, load_file(str(path / WEIGHTS_NAME)), str(path / WEIGHTS_NAME))
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device) if device is not None else model


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor in one error."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"{source}: weights do not fit the config: {shown}")
    model.load_state_dict(state, strict=True)
