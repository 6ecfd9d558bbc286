"""mamba-moe: hybrid Mamba2 + Mixture-of-Experts + attention language models."""

from .api import create_mamba_moe
from .config import ConfigError, MambaMoEConfig, get_preset
from .model import MambaMoEBackbone, MambaMoEForCausalLM

__version__ = "0.1.0"

__all__ = ["ConfigError", "MambaMoEBackbone", "MambaMoEConfig", "MambaMoEForCausalLM", "create_mamba_moe",
           "get_preset", "__version__"]
