"""Importers of checkpoints from other libraries into ``MambaMoEForCausalLM``."""

from .hf_mamba2 import config_from_hf, load_hf_mamba2

__all__ = ["config_from_hf", "load_hf_mamba2"]
