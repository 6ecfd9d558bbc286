"""The one exception type of the exporters."""

from __future__ import annotations


class ExportError(ValueError):
    """A checkpoint cannot be exported as asked; the message names the rule, tensor, field, type or file."""
