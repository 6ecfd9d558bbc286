"""Weight initialisation, applied once to a freshly built model."""

from __future__ import annotations

import math

from torch import nn

from ..config import MambaMoEConfig
from .embedding import TokenEmbedding
from .ffn import ExpertBank

# Projections that write into the residual stream: scaled down with depth (GPT-2 style) so the
# residual's variance does not grow with the number of layers.
_RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")


def init_weights(model: nn.Module, config: MambaMoEConfig) -> None:
    std = config.initializer_range
    residual_std = std / math.sqrt(2 * config.n_layers)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, residual_std if leaf in _RESIDUAL_OUTPUTS else std)
        elif isinstance(module, ExpertBank):
            for pname, param in module.named_parameters(recurse=False):
                nn.init.normal_(param, 0.0, residual_std if pname == "down_proj" else std)
        elif isinstance(module, TokenEmbedding):
            # A factorized table is scaled so its product with proj has the plain table's scale.
            nn.init.normal_(module.weight, 0.0, 1.0 / math.sqrt(module.rank) if module.rank else std)
            module.weight._no_weight_decay = True
