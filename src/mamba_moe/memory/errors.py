"""The memory package's errors: one family, each message naming the file, user or field at fault.

They derive from :class:`~mamba_moe.validation.ConfigError` (a ``ValueError``), so the ``mamba-moe``
command's error handler prints them as ``error: ...`` with exit code 2, and callers that already catch
``ValueError`` keep working. :class:`MemoryInputError` is also an
:class:`~mamba_moe.user_text.InvalidTextError`, so a server that answers 400 for bad user text answers 400
for text the store refuses.
"""

from __future__ import annotations

from ..user_text import InvalidTextError
from ..validation import ConfigError


class MemoryStoreError(ConfigError):
    """Anything the memory store refuses or cannot do; the message names the DB file or the field."""


class ForeignDatabaseError(MemoryStoreError):
    """The file is not SQLite, or it is an SQLite file some other program wrote (not a memory DB)."""


class NewerSchemaError(MemoryStoreError):
    """The DB was written by a newer version of the store; opening it could lose what that version keeps."""


class EmbedderMismatchError(MemoryStoreError):
    """The DB's vectors came from another embedder (name or dim); mixing them would rank garbage."""


class MemoryInputError(MemoryStoreError, InvalidTextError):
    """A bad user name or text: empty, not valid UTF-8, or over the documented size limit. Nothing is stored."""
