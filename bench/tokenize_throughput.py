"""Tokenization throughput on the embedded corpus (the interpreter's stdlib ``*.py`` files).

    python bench/tokenize_throughput.py                          # 32k-vocab stdlib tokenizer (trained once, cached)
    python bench/tokenize_throughput.py --vocab-size 8192 --workers 2 --repeats 3
    python bench/tokenize_throughput.py --tokenizer path/to/tokenizer_dir
    python bench/tokenize_throughput.py --append docs/benchmarks.md   # also append a dated section

Rows (best of ``--repeats``; text is read into memory first, so no disk I/O is timed):
1. ``tokenizers`` ``encode_batch_fast``, one thread (TOKENIZERS_PARALLELISM=false): the reference.
2. ``DocumentEncoder`` (what ``data prepare`` uses), one process, fresh pre-token cache, as a worker's
   first shard sees it; and 3. the same encoder on a second pass (warm cache).
4. The ``prepare`` path in ``--workers`` processes (multiprocessing pool, one encoder per worker,
   documents in ~1 MB chunks): wall-clock throughput of the whole machine, then per core; first pass
   (fresh caches, pool start included) and best later pass (warm caches, as in a long run).
5. ``data prepare`` end to end on the same corpus (reading files, hashing, dedup, tokenizing in workers,
   writing shards; 1 MB shards; tokens include one separator per document).
MB are 10^6 bytes of UTF-8 text. "CPU MB/s" divides by the process's CPU time instead of wall time, which
stays meaningful when other jobs share the machine (the load average is printed for that reason).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers starts its thread pool

import argparse  # noqa: E402
import datetime  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from _machine import append_markdown, cpu_name  # noqa: E402

from mamba_moe.data.encode import DocumentEncoder  # noqa: E402
from mamba_moe.data.sources import stdlib_files  # noqa: E402
from mamba_moe.data.tokenizer import (  # noqa: E402
    backend,
    llama_cpp_pre_name,
    load_tokenizer,
    raw_copy,
    stdlib_tokenizer,
    tokenizer_hash,
)


def read_corpus(include_tests: bool) -> list[str]:
    texts = []
    for path in stdlib_files(include_tests=include_tests):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


_ENCODER: dict[str, DocumentEncoder] = {}


def _init(tokenizer_json: str) -> None:
    _ENCODER["e"] = DocumentEncoder(tokenizer_json)


def _count(chunk: list[str]) -> tuple[int, float]:
    start = time.process_time()
    n = sum(len(ids) for ids in _ENCODER["e"].encode_batch(chunk))
    return n, time.process_time() - start


def chunks(texts: list[str], size: int = 1_000_000) -> list[list[str]]:
    out, cur, used = [], [], 0
    for t in texts:
        cur.append(t)
        used += len(t)
        if used >= size:
            out.append(cur)
            cur, used = [], 0
    return out + ([cur] if cur else [])


def bench_pool(tokenizer_json: str, texts: list[str], workers: int, passes: int) -> list[tuple[float, float, int]]:
    """One pool, ``passes`` passes over the corpus: (wall seconds, summed worker CPU seconds, tokens) each.

    The first pass starts from empty pre-token caches (and includes the pool's start); later passes show
    the steady state of a long ``prepare`` run, whose workers live across thousands of shards.
    """
    start = time.perf_counter()
    out = []
    with multiprocessing.get_context().Pool(workers, initializer=_init, initargs=(tokenizer_json,)) as pool:
        for _ in range(passes):
            results = pool.map(_count, chunks(texts), chunksize=1)
            out.append((time.perf_counter() - start, sum(c for _, c in results), sum(n for n, _ in results)))
            start = time.perf_counter()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: stdlib-trained, cached)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the default tokenizer")
    parser.add_argument("--include-tests", action="store_true", help="also the stdlib's test folders")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the whole `prepare` run")
    parser.add_argument("--append", type=Path, metavar="FILE", help="append a dated section to this markdown file")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else stdlib_tokenizer(vocab_size=args.vocab_size)
    texts = read_corpus(args.include_tests)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mb = n_bytes / 1e6
    reference = raw_copy(tok)
    tokenizer_json = backend(tok).to_str()

    rows = []

    def add(name: str, procs: int, wall: float, cpu: float | None, tokens: int) -> None:
        rows.append([name, str(procs), f"{wall:.2f}", f"{mb / wall:.2f}", f"{tokens / wall:,.0f}",
                     f"{mb / wall / procs:.2f}", f"{mb / cpu:.2f}" if cpu else "–"])

    best = min((timed(lambda: reference.encode_batch_fast(texts)) for _ in range(args.repeats)), key=lambda r: r[0])
    tokens = sum(len(e.ids) for e in best[2])
    add("tokenizers encode_batch_fast (1 thread)", 1, best[0], best[1], tokens)

    cold, warm = [], []
    for _ in range(args.repeats):
        encoder = DocumentEncoder(tok)
        cold.append(timed(lambda encoder=encoder: encoder.encode_batch(texts)))
        warm.append(timed(lambda encoder=encoder: encoder.encode_batch(texts)))
    for name, runs in (("DocumentEncoder, fresh cache", cold), ("DocumentEncoder, warm cache", warm)):
        wall, cpu, out = min(runs, key=lambda r: r[0])
        assert sum(len(x) for x in out) == tokens, "fast encoder disagrees with tokenizers"
        add(name, 1, wall, cpu, tokens)

    pool_runs = bench_pool(tokenizer_json, texts, args.workers, args.repeats + 1)
    assert all(n == tokens for _, _, n in pool_runs)
    wall, cpu, _ = pool_runs[0]
    add(f"prepare path, {args.workers} processes, fresh caches (pool start included)", args.workers, wall, cpu,
        tokens)
    wall, cpu, _ = min(pool_runs[1:], key=lambda r: r[0])
    add(f"prepare path, {args.workers} processes, warm caches", args.workers, wall, cpu, tokens)

    if not args.no_end_to_end:
        import resource
        import tempfile

        from mamba_moe.data.prepare import prepare_stdlib

        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall, cpu, result = timed(lambda tmp=tmp: prepare_stdlib(
                    tok.name_or_path, tmp, include_tests=args.include_tests, val_fraction=0.0, workers=args.workers,
                    shard_mb=1.0))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu += (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
                runs.append((wall, cpu, result))
        wall, cpu, result = min(runs, key=lambda r: r[0])
        add(f"`data prepare` end to end, {args.workers} workers (read, dedup, tokenize, write)", args.workers, wall,
            cpu, result.manifest["totals"]["train"]["tokens"])

    header = ["method", "processes", "seconds", "MB/s", "tokens/s", "MB/s per core", "CPU MB/s per core"]
    rule = [":---"] + ["---:"] * (len(header) - 1)
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, rule, *rows])
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    env = [
        f"- date: {now}",
        f"- device: CPU, {cpu_name()}, {os.cpu_count()} logical cores; load average (1 min) "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
        f"- Python {platform.python_version()}, tokenizers {__import__('tokenizers').__version__}, "
        f"regex {__import__('regex').__version__}",
        f"- corpus: stdlib *.py{' incl. tests' if args.include_tests else ' (no tests)'}, {len(texts)} files, "
        f"{mb:.1f} MB, {tokens:,} tokens ({n_bytes / tokens:.2f} bytes/token)",
        f"- tokenizer: {args.tokenizer or 'stdlib-trained'}, {len(tok)} tokens, pre-tokenizer "
        f"{llama_cpp_pre_name(tok)!r}, hash {tokenizer_hash(tok)[:16]}…; best of {args.repeats}",
        f"- command: `{command}`",
    ]
    text = "### Tokenization throughput (embedded corpus)\n\n" + "\n".join(env) + "\n\n" + table + "\n"
    print(text)
    if args.append is not None:
        append_markdown(str(args.append), text)
        print(f"appended to {args.append}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
