"""Export to llama.cpp GGUF: which configs fit the ``granitehybrid`` architecture, and the exporter itself."""

from .errors import ExportError
from .gguf_export import export_gguf
from .granite_rules import CAVEATS, RULES, ExportBlocker, check_exportable, export_blockers, export_caveats

__all__ = ["CAVEATS", "RULES", "ExportBlocker", "ExportError", "check_exportable", "export_blockers", "export_caveats",
           "export_gguf"]
