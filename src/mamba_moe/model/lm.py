"""The causal language model: embeddings, the hybrid backbone and a (tied) output head."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import MambaMoEConfig
from .backbone import MambaMoEBackbone, check_mask
from .cache import HybridCache
from .embedding import TokenEmbedding
from .ffn import RouterStats
from .init import init_weights
from .params import count_parameters

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class CausalLMOutput:
    logits: Tensor
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
                cache: HybridCache | None = None) -> CausalLMOutput:
        """Logits for every position; the LM loss when labels are given (shifted inside, -100 ignored).

        With ``cache`` (from ``new_cache``), successive calls continue the same sequences.
        """
        self._check_ids(input_ids)
        b, l = input_ids.shape
        attention_mask = check_mask(attention_mask, b, l, "attention_mask")
        out = self.backbone.run(self.embed(input_ids), attention_mask, cache)
        logits = self.embed.logits(out.hidden) if self.lm_head is None else self.lm_head(out.hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, "
                                 f"got {tuple(labels.shape)}")
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask, -100)
            loss_dtype = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(logits[:, :-1].to(loss_dtype).reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=out.aux_loss, router_stats=out.router_stats)

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
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / WEIGHTS_NAME)
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
