"""Training: ``TrainConfig`` (YAML), ``Trainer`` (AdamW groups, warmup+cosine/WSD, accumulation, clipping,
validation, atomic checkpoints with exact resume) and the ``mamba-moe train`` command. See docs/training.md."""

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import DataSpec, ModelSpec, TrainConfig, apply_overrides
from .optim import build_optimizer, param_groups
from .schedule import lr_at
from .trainer import Trainer, TrainingDiverged, TrainResult

__all__ = ["DataSpec", "ModelSpec", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "apply_overrides",
           "build_optimizer", "latest_checkpoint", "list_checkpoints", "lr_at", "param_groups"]
