"""Supervised fine-tuning batches: chats rendered with the template, loss only on the assistant's tokens.

Chat datasets are small next to pre-training corpora, so :class:`SFTDataset` tokenizes them in memory
(from in-memory lists or from chat sources: JSONL/Parquet/HF with a ``messages`` field).
:class:`SFTLoader` either packs several chats into each row of ``seq_len + 1`` tokens (position ids
restart at every chat) or pads one chat per row. Like the pre-training loader it walks one global row
order shared by all ranks, reshuffled every pass, with an exact ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops.cross_entropy import IGNORE_INDEX
from .chat import encode_chat
from .config import DataError, SourceConfig
from .encode import DocumentEncoder
from .loader import _key, permute, positions_from_starts
from .sources import (
    BAD_MESSAGES,
    INVALID_TEXT,
    Document,
    SkipLog,
    check_source,
    iter_documents,
    messages_problem,
    text_problem,
)
from .split import split_documents
from .tokenizer import special_ids, tokenizer_hash

__all__ = ["IGNORE_INDEX", "SFTBatch", "SFTDataset", "SFTLoader", "read_chats"]  # IGNORE_INDEX: ops' own

NO_TRAINED_TOKENS = "no-assistant-turn"
TOO_LONG = "too-long"
NOT_A_CHAT = "not-a-chat"
_STATE_VERSION = 1


class SFTDataset:
    """Tokenized chats: for each, ids and a 0/1 mask that is 1 exactly on trained (assistant) tokens.

    A chat longer than ``max_tokens`` is dropped, or cut to ``max_tokens`` with ``truncate=True``; a chat
    with no trained token is dropped. Both are counted in ``skips`` under the chat's location.
    """

    def __init__(self, chats: Iterable[Sequence[dict[str, str]] | Document], tokenizer: Any, max_tokens: int,
                 train_roles: Sequence[str] = ("assistant",), truncate: bool = False,
                 skips: SkipLog | None = None, source: str = "chats") -> None:
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise DataError(f"max_tokens: must be an integer >= 2 (got {max_tokens!r})")
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        self.special = special_ids(tokenizer)
        self.skips = skips if skips is not None else SkipLog()
        encoder = DocumentEncoder(tokenizer)
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for i, item in enumerate(chats):
            where, messages = (item.where, item.messages) if isinstance(item, Document) else (f"{source}[{i}]", item)
            if messages is None:
                self.skips.skip(source, NOT_A_CHAT, where, "plain text, not a chat")
                continue
            problem = messages_problem(messages)
            if problem:
                self.skips.skip(source, BAD_MESSAGES, where, problem)
                continue
            problem = text_problem(Document(text=None, messages=messages, where=where))
            if problem:  # in-memory chats are not read through iter_documents, which checks this for files
                self.skips.skip(source, INVALID_TEXT, where, problem)
                continue
            ids, mask = encode_chat(encoder.encode, self.special, messages, train_roles)
            if len(ids) > max_tokens:
                if not truncate:
                    self.skips.skip(source, TOO_LONG, where, f"{len(ids)} tokens > {max_tokens}")
                    continue
                ids, mask = ids[:max_tokens], mask[:max_tokens]
            if not any(mask[1:]):  # position 0 is never a target
                self.skips.skip(source, NO_TRAINED_TOKENS, where)
                continue
            self.ids.append(np.asarray(ids, dtype=np.int64))
            self.masks.append(np.asarray(mask, dtype=bool))
        if not self.ids:
            raise DataError(f"{source}: no usable chat ({'; '.join(self.skips.lines()) or 'nothing given'})")

    @classmethod
    def from_sources(cls, sources: Sequence[SourceConfig], tokenizer: Any, max_tokens: int,
                     **kwargs: Any) -> SFTDataset:
        """Chats from configured sources (each needs ``messages_field``); skips of every source counted."""
        log = kwargs.pop("skips", None) or SkipLog()
        chats = []
        for i, source in enumerate(sources):
            if not source.messages_field:
                raise DataError(f"sources[{i}].messages_field: SFT needs chat records; set the field holding "
                                "the messages list")
            chats += list(iter_documents(source, log))
        return cls(chats, tokenizer, max_tokens, skips=log, source="sft", **kwargs)

    def __len__(self) -> int:
        return len(self.ids)


def read_chats(paths: str | Sequence[str], skips: SkipLog, messages_field: str = "messages",
               max_docs: int | None = None, seed: int = 0, val_fraction: float = 0.0, name: str = "chat",
               where: str = "data") -> tuple[list[Document], list[Document]]:
    """(train, validation) chats of JSONL files, split by :func:`~mamba_moe.data.split.split_documents`.

    Every record that is not a usable chat is counted in ``skips`` under its reason with ``file:line``
    (bad JSON, not an object, missing ``messages_field``, bad messages, invalid UTF-8 or text, empty), so a
    caller reports what the data lost instead of training on less without a word. Configuration
    problems (a path that matches nothing) raise :class:`DataError` naming ``where``.
    """
    source = SourceConfig(name=name, kind="jsonl", domain="chat", paths=[paths] if isinstance(paths, str)
                          else list(paths), messages_field=messages_field, max_docs=max_docs)
    source.validate(where)
    check_source(source, where)  # a path that matches nothing fails here, naming ``where``
    return split_documents(iter_documents(source, skips), seed, val_fraction)


@dataclass
class SFTBatch:
    """``tokens``/``loss_mask`` are ``(B, seq_len + 1)``. The model reads ``input_ids`` (with
    ``attention_mask`` False on padding and ``position_ids`` restarting per chat) and is scored on
    ``targets``: the next token where it is an assistant token, ``-100`` elsewhere."""

    tokens: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    example_ids: list[list[int]]

    @property
    def input_ids(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> Tensor:
        return self.tokens[:, 1:].masked_fill(~self.loss_mask[:, 1:], IGNORE_INDEX)


class SFTLoader:
    """Batches of ``batch_size`` rows of ``seq_len + 1`` tokens for ``rank`` of ``world_size``.

    ``pack=True`` fills each row with consecutive chats of the shuffled order (a chat never straddles two
    rows); ``pack=False`` puts one chat per row. Padding uses the pad id, with mask and attention off.
    """

    def __init__(self, dataset: SFTDataset, seq_len: int, batch_size: int, pack: bool = True, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, loop: bool = True) -> None:
        longest = max(len(x) for x in dataset.ids)
        if not isinstance(seq_len, int) or seq_len + 1 < longest:
            raise DataError(f"seq_len: {seq_len!r} + 1 is shorter than the longest chat ({longest} tokens); "
                            "raise it or build the dataset with max_tokens <= seq_len + 1")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: must be a positive integer (got {batch_size!r})")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank: must satisfy 0 <= rank < world_size (got rank={rank!r}, world_size={world_size!r})")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.pack, self.rank, self.world_size = pack, rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.epoch = 0
        self.row = 0
        self._rows: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        """The rows (lists of example indices) of one pass, in order."""
        if epoch not in self._rows:
            n = len(self.dataset)
            key = _key(self.seed, "sft", epoch)
            order = [permute(i, n, key) for i in range(n)] if self.shuffle else list(range(n))
            rows: list[list[int]] = []
            if not self.pack:
                rows = [[i] for i in order]
            else:
                room = 0
                for i in order:
                    size = len(self.dataset.ids[i])
                    if not rows or size > room:
                        rows.append([])
                        room = self.seq_len + 1
                    rows[-1].append(i)
                    room -= size
            self._rows = {epoch: rows}  # keep one pass in memory
        return self._rows[epoch]

    def __len__(self) -> int:
        """Whole global batches in one pass."""
        return len(self.rows(0)) // (self.batch_size * self.world_size)

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> SFTBatch:
        global_batch = self.batch_size * self.world_size
        if not self.loop and (self.epoch > 0 or self.row + global_batch > len(self.rows(0))):
            raise StopIteration
        picks = []
        for offset in range(global_batch):
            rows = self.rows(self.epoch)
            if self.rank * self.batch_size <= offset < (self.rank + 1) * self.batch_size:
                picks.append(rows[self.row])
            self.row += 1
            if self.row == len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        return self._collate(picks)

    def _collate(self, picks: list[list[int]]) -> SFTBatch:
        length = self.seq_len + 1
        pad = self.dataset.special.pad
        tokens = np.full((len(picks), length), pad, dtype=np.int64)
        mask = np.zeros((len(picks), length), dtype=bool)
        attention = np.zeros((len(picks), length), dtype=bool)
        positions = np.zeros((len(picks), self.seq_len), dtype=np.int64)
        for r, row in enumerate(picks):
            at, starts = 0, []
            for i in row:
                ids = self.dataset.ids[i]
                tokens[r, at:at + len(ids)] = ids
                mask[r, at:at + len(ids)] = self.dataset.masks[i]
                attention[r, at:at + len(ids)] = True
                starts.append(at)
                at += len(ids)
            if at < length:
                starts.append(at)  # padding counts from 0 too (it is masked anyway)
            positions[r] = positions_from_starts(self.seq_len, np.asarray(starts, dtype=np.int64))
        return SFTBatch(tokens=torch.from_numpy(tokens), loss_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions), attention_mask=torch.from_numpy(attention[:, :-1]),
                        example_ids=[list(row) for row in picks])

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "pack": self.pack, "seq_len": self.seq_len,
                "examples": len(self.dataset), "tokenizer_hash": self.dataset.tokenizer_hash}

    def state_dict(self) -> dict[str, Any]:
        """Position in the global row order (same on every rank)."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "row": self.row, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"sft loader state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(f"sft loader state: {key} differs (saved {state.get(key)!r}, now {value!r})")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
