"""Token embeddings, plain or factorized (vocab -> rank -> d_model), tied with the output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenEmbedding(nn.Module):
    """``rank == 0``: a vocab x d_model table. ``rank > 0``: a vocab x rank table and a rank -> d_model map.

    A factorized embedding of a 32k vocabulary at rank 256 costs 8.4M parameters instead of 32.8M at
    d_model 1024. The tied output head reuses both factors: logits = (h P) E^T. At export the product
    E P^T is multiplied out into an ordinary table (llama.cpp has no factorized embedding).
    """

    def __init__(self, vocab_size: int, d_model: int, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        self.weight = nn.Parameter(torch.empty(vocab_size, rank or d_model))
        self.proj = nn.Linear(rank, d_model, bias=False) if rank else None

    def forward(self, input_ids: Tensor) -> Tensor:
        x = F.embedding(input_ids, self.weight)
        return self.proj(x) if self.proj is not None else x

    def logits(self, hidden: Tensor) -> Tensor:
        """The tied output head: hidden (..., d_model) -> (..., vocab)."""
        if self.proj is not None:
            hidden = hidden @ self.proj.weight  # (d_model) -> (rank): the transpose of proj
        return F.linear(hidden, self.weight)

    def full_table(self) -> Tensor:
        """The vocab x d_model matrix this embedding computes (what the exporter writes)."""
        return self.weight @ self.proj.weight.T if self.proj is not None else self.weight

    def linear_head(self) -> nn.Module:
        """The tied output head as ``nn.Linear`` layers over these weights (shared, not copied): what weight
        transforms such as int8 quantization take. Computes exactly ``logits``."""
        vocab, width = self.weight.shape
        table = nn.Linear(width, vocab, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        table.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        if self.proj is None:
            return table
        down = nn.Linear(self.proj.out_features, self.rank, bias=False, device=self.weight.device,
                         dtype=self.weight.dtype)
        down.weight = nn.Parameter(self.proj.weight.detach().t(), requires_grad=False)  # d_model -> rank
        return nn.Sequential(down, table)
