"""Training: ``TrainConfig`` (YAML), ``Trainer`` (AdamW groups, warmup+cosine/WSD, accumulation, clipping,
validation, atomic checkpoints with exact resume, ``--checkpoint`` stage starts, SFT on chats, distillation,
QAT, domain-guided routing, DDP/FSDP2) and the ``mamba-moe train`` command. See docs/training.md."""

from .checkpoint import latest_checkpoint, list_checkpoints, resolve_init_checkpoint
from .config import DataSpec, DistillSpec, DomainRoutingSpec, ModelSpec, QATSpec, TrainConfig, apply_overrides
from .optim import build_optimizer, param_groups
from .schedule import lr_at
from .trainer import Trainer, TrainingDiverged, TrainResult

__all__ = ["DataSpec", "DistillSpec", "DomainRoutingSpec", "ModelSpec", "QATSpec", "TrainConfig", "TrainResult",
           "Trainer", "TrainingDiverged", "apply_overrides", "build_optimizer", "latest_checkpoint",
           "list_checkpoints", "lr_at", "param_groups", "resolve_init_checkpoint"]
