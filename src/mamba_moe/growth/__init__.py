"""Growing a trained model instead of starting over (docs/growth.md).

Function-preserving operations on a model (each returns a new model; the source is untouched):

- :func:`add_experts`: every expert copied m times, router rows copied (softmax mass split between copies).
- :func:`add_layers`: identity layers (zeroed output projections) inserted at any depth.
- :func:`dense_to_moe`: dense FFNs upcycled into E copies (and FFN-less layers given silent MoE FFNs).

Not function-preserving: :func:`change_router` (``topk:K`` for cheaper inference; measure with
:func:`heldout_loss`). :func:`grow_checkpoint` runs one of them from checkpoint to checkpoint, checked and
recorded in ``growth.json``. LoRA through PEFT lives in :mod:`mamba_moe.growth.lora` (needs ``peft``).
"""

from .checkpoint import HISTORY_NAME, format_history, read_history
from .common import GrowthError, logits_rel_error
from .evaluate import expert_load, heldout_loss, heldout_windows
from .experts import add_experts
from .grow import OPERATIONS, GrowthReport, apply_operation, grow_checkpoint
from .layers import add_layers
from .router import change_router, parse_router
from .upcycle import dense_to_moe

__all__ = [
    "HISTORY_NAME", "OPERATIONS", "GrowthError", "GrowthReport", "add_experts", "add_layers", "apply_operation",
    "change_router", "dense_to_moe", "expert_load", "format_history", "grow_checkpoint", "heldout_loss",
    "heldout_windows", "logits_rel_error", "parse_router", "read_history",
]
