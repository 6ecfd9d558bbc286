"""Data pipeline: tokenizer, corpus sources and mixtures, token shards, pre-training and SFT loaders.

Typical use (see docs/data.md)::

    tok = stdlib_tokenizer(vocab_size=8192)                      # or load_tokenizer("path/to/dir_or.gguf")
    prepare_stdlib(tok.name_or_path, "data/stdlib")             # or prepare(PrepareConfig.load("x.yaml"))
    loader = PackedLoader(PackedDataset("data/stdlib", seq_len=512, tokenizer=tok), batch_size=8)
"""

from .chat import ChatEncoder, encode_chat, encode_chat_prompt
from .chatml import CHAT_TEMPLATE, END_TOKENS, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, render_chat_text
from .config import DataError, PrepareConfig, SourceConfig
from .encode import DocumentEncoder
from .loader import Batch, PackedDataset, PackedLoader
from .prepare import PrepareResult, prepare, prepare_stdlib
from .sft import SFTBatch, SFTDataset, SFTLoader, read_chats
from .shards import TokenizerMismatchError, load_manifest
from .sources import SkipLog, stdlib_files
from .split import content_digest, is_validation, split_documents
from .tokenizer import (
    LLAMA_CPP_PRE,
    TokenizerError,
    TokenizerNotFoundError,
    llama_cpp_pre_name,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    stdlib_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE", "END_TOKENS", "LLAMA_CPP_PRE", "SPECIAL_TOKENS", "SPECIAL_TOKEN_IDS", "Batch", "ChatEncoder",
    "DataError", "DocumentEncoder", "PackedDataset", "PackedLoader", "PrepareConfig", "PrepareResult", "SFTBatch",
    "SFTDataset", "SFTLoader", "SkipLog", "SourceConfig", "TokenizerError", "TokenizerMismatchError",
    "TokenizerNotFoundError", "content_digest", "encode_chat", "encode_chat_prompt", "is_validation",
    "llama_cpp_pre_name", "load_manifest", "load_tokenizer", "prepare", "prepare_stdlib", "read_chats",
    "render_chat_text", "save_tokenizer", "special_ids", "split_documents", "stdlib_files", "stdlib_tokenizer",
    "tokenizer_hash", "train_tokenizer",
]
