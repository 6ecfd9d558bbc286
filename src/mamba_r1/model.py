"""``mamba_r1.model.create_mamba_moe`` as seed 004 imports it; the implementation is mamba_moe's."""

from mamba_moe.api import create_mamba_moe

__all__ = ["create_mamba_moe"]
