"""Compatibility name for seed 004's package: ``from mamba_r1.model import create_mamba_moe``."""

from mamba_moe.api import create_mamba_moe

__all__ = ["create_mamba_moe"]
