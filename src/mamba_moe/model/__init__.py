"""nn.Modules of the hybrid model; the math they call lives in ``mamba_moe.ops``."""

from .backbone import BackboneOutput, MambaMoEBackbone
from .cache import HybridCache, KVState, MambaState
from .lm import CausalLMOutput, MambaMoEForCausalLM

__all__ = ["BackboneOutput", "CausalLMOutput", "HybridCache", "KVState", "MambaMoEBackbone", "MambaMoEForCausalLM",
           "MambaState"]
