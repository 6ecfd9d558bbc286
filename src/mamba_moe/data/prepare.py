"""``data prepare``: read a mixture of sources, tokenize in parallel, write token shards and a manifest.

The main process reads documents in a fixed order (sources in config order), drops exact duplicates,
assigns each document to train or validation from a keyed hash of its content (:mod:`.split`), and groups documents
into shards of about ``shard_mb`` of text per (source, split). Worker processes tokenize and write the
shards. A shard whose inputs (document hashes, tokenizer, format) match a finished shard on disk is not
tokenized again, so an interrupted or extended run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from .chat import encode_chat
from .config import DataError, PrepareConfig, SourceConfig
from .encode import DocumentEncoder
from .shards import FORMAT, MANIFEST, VERSION, finished_shard, remove_temporaries, write_shard
from .sources import DUPLICATE, SkipLog, check_source, iter_documents
from .split import content_digest, is_validation
from .tokenizer import (
    backend,
    llama_cpp_pre_name,
    load_tokenizer,
    special_ids,
    token_dtype_bits,
    tokenizer_hash,
    vocab_size_of,
)

SPLITS = ("train", "val")


@dataclass
class PrepareResult:
    """What a run did: the manifest it wrote and how much work it did or reused."""

    manifest: dict[str, Any]
    shards_written: int
    shards_reused: int
    seconds: float
    text_bytes: int
    tokens_written: int
    skips: SkipLog
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        m = self.manifest
        lines = [f"prepared {m['output']}: {self.shards_written} shard(s) written, {self.shards_reused} reused "
                 f"in {self.seconds:.1f}s"]
        for split in SPLITS:
            t = m["totals"][split]
            by = ", ".join(f"{d}: {v['tokens']:,}" for d, v in sorted(t["by_domain"].items()))
            lines.append(f"  {split}: {t['docs']:,} docs, {t['tokens']:,} tokens" + (f" ({by})" if by else ""))
        if self.tokens_written and self.seconds > 0:
            lines.append(f"  tokenized {self.text_bytes / 1e6:.1f} MB of text -> {self.tokens_written:,} tokens "
                         f"({self.text_bytes / 1e6 / self.seconds:.2f} MB/s, "
                         f"{self.tokens_written / self.seconds:,.0f} tokens/s overall)")
        lines += ["  " + line for line in self.skips.lines()]
        lines += ["  warning: " + w for w in self.warnings]
        return "\n".join(lines)


@dataclass
class _Job:
    stem: str
    source: str
    domain: str
    split: str
    index: int
    docs: list[str | list[dict[str, str]]]
    digests: list[bytes]
    n_bytes: int

    def fingerprint(self, settings: str) -> str:
        h = hashlib.sha256(settings.encode())
        for digest in self.digests:
            h.update(digest)
        return h.hexdigest()


# ---- worker side ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, parallel_tokenizer: bool) -> None:
    if not parallel_tokenizer:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER["encoder"] = DocumentEncoder(tokenizer_json)


def _encode_docs(encoder: DocumentEncoder, special: Any, docs: list[Any]) -> list[list[int]]:
    texts = [(i, d) for i, d in enumerate(docs) if isinstance(d, str)]
    out: list[list[int] | None] = [None] * len(docs)
    for (i, _), ids in zip(texts, encoder.encode_batch([d for _, d in texts]), strict=True):
        out[i] = ids
    for i, doc in enumerate(docs):
        if out[i] is None:
            out[i] = encode_chat(encoder.encode, special, doc)[0]
    return out  # type: ignore[return-value]


def _run_job(args: tuple[str, _Job, str, dict[str, Any], Any]) -> dict[str, Any]:
    root, job, dtype, meta, special = args
    ids = _encode_docs(_WORKER["encoder"], special, job.docs)
    return write_shard(Path(root), job.stem, ids, special.eos, dtype, meta)


# ---- main side ------------------------------------------------------------------------------------

def _jobs(config: PrepareConfig, log: SkipLog, counts: dict[str, int], bar: Any) -> Iterator[_Job]:
    """Group each source's documents into shard jobs per split, in a deterministic order."""
    limit = int(config.shard_mb * 1e6)
    seen: set[bytes] = set()
    for source in config.sources:
        pending: dict[str, list[tuple[Any, bytes, int]]] = {s: [] for s in SPLITS}
        sizes = dict.fromkeys(SPLITS, 0)
        index = dict.fromkeys(SPLITS, 0)

        def emit(split: str, source=source, pending=pending, sizes=sizes, index=index) -> _Job:
            batch = pending[split]
            job = _Job(stem=f"{source.name}/{split}/{index[split]:05d}", source=source.name, domain=source.domain,
                       split=split, index=index[split], docs=[d for d, _, _ in batch],
                       digests=[g for _, g, _ in batch], n_bytes=sizes[split])
            pending[split], sizes[split] = [], 0
            index[split] += 1
            return job

        for doc in iter_documents(source, log, config.min_chars):
            digest = content_digest(doc)
            n_bytes = len(doc.key().encode("utf-8"))  # valid UTF-8: iter_documents skipped invalid text
            bar.update(n_bytes)
            if config.dedup:
                if digest in seen:
                    log.skip(source.name, DUPLICATE, doc.where)
                    continue
                seen.add(digest)
            split = "val" if is_validation(digest, config.seed, config.val_fraction) else "train"
            pending[split].append((doc.text if doc.text is not None else doc.messages, digest, n_bytes))
            sizes[split] += n_bytes
            counts[source.name] += 1
            if sizes[split] >= limit:
                yield emit(split)
        for split in SPLITS:
            if pending[split]:
                yield emit(split)


def _progress(config: PrepareConfig) -> Any:
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="prepare", file=sys.stderr,
                disable=not config.progress, dynamic_ncols=True)


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run the whole preparation described by ``config``; see the module docstring."""
    start = time.perf_counter()
    for i, source in enumerate(config.sources):  # every configuration problem before any work
        check_source(source, f"sources[{i}]")
    tokenizer = load_tokenizer(config.tokenizer)
    thash = tokenizer_hash(tokenizer)
    special = special_ids(tokenizer)
    vocab = vocab_size_of(tokenizer)
    dtype = config.dtype if config.dtype != "auto" else f"uint{token_dtype_bits(vocab)}"
    if dtype == "uint16" and vocab > 1 << 16:
        raise DataError(f"dtype: uint16 cannot hold ids of a {vocab}-token vocabulary; use uint32 or auto")
    if any(s.messages_field for s in config.sources) and (special.im_start is None or special.im_end is None):
        raise DataError(f"tokenizer {config.tokenizer}: has no <|im_start|>/<|im_end|>, needed by chat sources")

    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    leftovers = remove_temporaries(root)
    settings = json.dumps({"format": FORMAT, "version": VERSION, "tokenizer": thash, "dtype": dtype,
                           "eos": special.eos}, sort_keys=True)
    log = SkipLog()
    counts: dict[str, int] = defaultdict(int)
    records: list[dict[str, Any]] = []
    written = reused = tokens_written = bytes_written = 0
    workers = config.workers or os.cpu_count() or 1
    bar = _progress(config)
    tokenizer_json = backend(tokenizer).to_str()

    def done(record: dict[str, Any], job_bytes: int) -> None:
        nonlocal written, tokens_written, bytes_written
        written += 1
        tokens_written += record["n_tokens"]
        bytes_written += job_bytes
        records.append(record)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{tokens_written / elapsed:,.0f} tok/s, {written} written, {reused} reused")

    def tasks() -> Iterator[tuple[_Job, dict[str, Any]]]:
        nonlocal reused
        for job in _jobs(config, log, counts, bar):
            fingerprint = job.fingerprint(settings)
            record = finished_shard(root, job.stem, fingerprint)
            if record is not None:
                reused += 1
                records.append(record)
                continue
            meta = {"fingerprint": fingerprint, "source": job.source, "domain": job.domain, "split": job.split,
                    "index": job.index, "text_bytes": job.n_bytes, "tokenizer_hash": thash}
            yield job, meta

    try:
        if workers <= 1:
            _init_worker(tokenizer_json, parallel_tokenizer=True)  # in-process: leave the environment alone
            for job, meta in tasks():
                done(_run_job((str(root), job, dtype, meta, special)), job.n_bytes)
        else:
            _run_pool(workers, tokenizer_json, tasks(), root, dtype, special, done)
    finally:
        bar.close()

    warnings = [f"removed {leftovers} temporary file(s) of an interrupted run"] if leftovers else []
    total_docs = sum(counts.values())
    if total_docs == 0:
        detail = "; ".join(log.lines()) or "the sources yielded nothing"
        raise DataError(f"empty corpus: no usable document in any source ({detail})")
    warnings += [f"source {s.name!r} produced no documents" for s in config.sources if counts[s.name] == 0]
    manifest = _manifest(config, tokenizer, thash, special, vocab, dtype, records, log)
    if config.val_fraction > 0 and manifest["totals"]["val"]["docs"] == 0:
        warnings.append("no document was drawn for validation (corpus too small for val_fraction)")
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    stale = _remove_stale_shards(root, config, {r["stem"] for r in records})  # after: the old manifest names them
    if stale:
        warnings.append(f"removed {stale} shard(s) of an earlier run that this configuration no longer makes")
    return PrepareResult(manifest=manifest, shards_written=written, shards_reused=reused,
                         seconds=time.perf_counter() - start, text_bytes=bytes_written, tokens_written=tokens_written,
                         skips=log, warnings=warnings)


def _remove_stale_shards(root: Path, config: PrepareConfig, current: set[str]) -> int:
    """Delete shards under this config's source folders that the run did not produce (e.g. after a change
    of ``shard_mb``); only files named like ours (``NNNNN.bin/.idx.npy/.json``) are touched."""
    removed = 0
    for source in config.sources:
        for split in SPLITS:
            folder = root / source.name / split
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                stem = path.name.split(".", 1)[0]
                if (len(stem) == 5 and stem.isdigit() and path.name[5:] in (".bin", ".idx.npy", ".json")
                        and f"{source.name}/{split}/{stem}" not in current):
                    removed += path.name.endswith(".json")
                    path.unlink()
    return removed


def _run_pool(workers: int, tokenizer_json: str, tasks: Iterator[tuple[_Job, dict[str, Any]]], root: Path,
              dtype: str, special: Any, done: Any) -> None:
    """Tokenize jobs in ``workers`` processes, keeping at most two jobs per worker in flight (bounded memory)."""
    from collections import deque

    # Workers are one per core, so tokenizers' own thread pool stays off in them; set while forking so a
    # parent that already used that pool does not make every child print the fork warning.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, False))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for job, meta in tasks:
            pending.append((pool.apply_async(_run_job, ((str(root), job, dtype, meta, special),)), job.n_bytes))
            while len(pending) >= 2 * workers:
                result, n_bytes = pending.popleft()
                done(result.get(), n_bytes)
        while pending:
            result, n_bytes = pending.popleft()
            done(result.get(), n_bytes)


def _manifest(config: PrepareConfig, tokenizer: Any, thash: str, special: Any, vocab: int, dtype: str,
              records: list[dict[str, Any]], log: SkipLog) -> dict[str, Any]:
    order = {s.name: i for i, s in enumerate(config.sources)}
    records = sorted(records, key=lambda r: (order[r["source"]], SPLITS.index(r["split"]), r["index"]))
    totals: dict[str, Any] = {s: {"docs": 0, "tokens": 0, "by_domain": {}} for s in SPLITS}
    per_source: dict[str, dict[str, dict[str, int]]] = {
        s.name: {split: {"docs": 0, "tokens": 0, "shards": 0} for split in SPLITS} for s in config.sources}
    for r in records:
        t = totals[r["split"]]
        t["docs"] += r["n_docs"]
        t["tokens"] += r["n_tokens"]
        d = t["by_domain"].setdefault(r["domain"], {"docs": 0, "tokens": 0})
        d["docs"] += r["n_docs"]
        d["tokens"] += r["n_tokens"]
        p = per_source[r["source"]][r["split"]]
        p["docs"] += r["n_docs"]
        p["tokens"] += r["n_tokens"]
        p["shards"] += 1
    return {
        "format": FORMAT, "version": VERSION, "output": str(config.output),
        "tokenizer": {"hash": thash, "path": str(config.tokenizer), "vocab_size": vocab, "eos_id": special.eos,
                      "pad_id": special.pad, "llama_cpp_pre": llama_cpp_pre_name(tokenizer)},
        "dtype": dtype, "seed": config.seed, "val_fraction": config.val_fraction, "dedup": config.dedup,
        "sources": [{"name": s.name, "kind": s.kind, "domain": s.domain, "weight": s.weight, **per_source[s.name]}
                    for s in config.sources],
        "totals": totals,
        "shards": [{k: r[k] for k in ("stem", "source", "domain", "split", "index", "n_docs", "n_tokens",
                                      "text_bytes", "fingerprint")} for r in records],
        "skips": log.to_dict(),
        "config": config.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_stdlib(tokenizer: str | os.PathLike, output: str | os.PathLike, include_tests: bool = False,
                   val_fraction: float = 0.01, seed: int = 0, workers: int = 0, shard_mb: float = 4.0,
                   max_docs: int | None = None, progress: bool = False) -> PrepareResult:
    """Shards of the embedded corpus (the stdlib's ``*.py``, domain "code") for demos and tests.

    Incremental like any prepare run: calling it again with the same tokenizer reuses the shards.
    """
    config = PrepareConfig(tokenizer=str(tokenizer), output=str(output), seed=seed, val_fraction=val_fraction,
                           workers=workers, shard_mb=shard_mb, progress=progress,
                           sources=[SourceConfig(name="stdlib", kind="stdlib", domain="code",
                                                 include_tests=include_tests, max_docs=max_docs)])
    return prepare(config)
