"""The 4-tier memory (working -> conversation -> long-term -> external); see docs/memory.md.

The store's modules import no torch themselves (``ModelEmbedder`` imports it when one is built).
"""

from .embedding import Embedder, HashedNgramEmbedder, ModelEmbedder
from .errors import EmbedderMismatchError, ForeignDatabaseError, MemoryInputError, MemoryStoreError, NewerSchemaError
from .records import DocumentHit, MemoryHit, MemoryRecord
from .store import MemoryStore

__all__ = ["DocumentHit", "Embedder", "EmbedderMismatchError", "ForeignDatabaseError", "HashedNgramEmbedder",
           "MemoryHit", "MemoryInputError", "MemoryRecord", "MemoryStore", "MemoryStoreError", "ModelEmbedder",
           "NewerSchemaError"]
