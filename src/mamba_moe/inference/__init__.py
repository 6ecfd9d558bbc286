"""Generation from a trained (or freshly built) model."""

from .greedy import greedy_generate

__all__ = ["greedy_generate"]
