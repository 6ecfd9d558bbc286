"""Export to llama.cpp GGUF: which configs fit the ``granitehybrid`` architecture."""

from .granite_rules import RULES, ExportBlocker, check_exportable, export_blockers

__all__ = ["RULES", "ExportBlocker", "check_exportable", "export_blockers"]
