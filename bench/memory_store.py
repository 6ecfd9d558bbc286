"""The memory store at scale: retrieval and write latency at 10k memories, and external-retrieval recall@5.

    python bench/memory_store.py                                  # 10k memories, 3 repeats, 10 recall seeds
    python bench/memory_store.py --memories 10000 --queries 200 --writes 200 --repeats 3
    python bench/memory_store.py --append docs/benchmarks.md      # also append a dated section

Latency: one user holds ``--memories`` memories (plus 10% as many for each of two other users, so every
query filters by user as in production), in a file DB on this machine's disk. Set-up inserts them with
``synchronous=OFF`` (set-up only); the measured writes run as shipped (``synchronous=FULL``, one
``BEGIN IMMEDIATE`` transaction each, half of them superseding a slot). Queries are stored facts
rewritten with a typo or a dropped word. p50/p95 are taken per repeat; the table shows the median over
repeats, for wall time and for the process's CPU time (the machine may be shared; CPU time is what other
jobs distort least). "cold" is the first search after opening (it loads the user's vectors and the FTS
vocabulary).

Recall: ``memory.retrieval_set`` (invented organisations' fact sheets; questions paraphrased, two thirds
with a typo in the name) for ``--recall-seeds`` seeds, recall@5 per mode: mean and the worst seed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import append_markdown, cpu_name

from mamba_moe.memory import MemoryStore
from mamba_moe.memory.retrieval_set import build_retrieval_set, recall_at_k

_SUBJECTS = ["my sister", "my landlord", "the dentist", "my manager", "our neighbour", "my cousin", "the coach",
             "my friend Ana", "the plumber", "my daughter", "the school", "my doctor", "the bakery"]
_VERBS = ["moved to", "recommended", "asked about", "is allergic to", "bought", "cancelled", "prefers",
          "booked", "lost", "repaired", "visited", "ordered"]
_OBJECTS = ["Lisbon", "peanuts", "a blue bicycle", "the Thursday appointment", "oat milk", "a cabin in Tartu",
            "the red umbrella", "Italian lessons", "a violin", "the winter tyres", "jasmine tea", "a used piano",
            "the garden fence", "a flight to Oslo", "yoga on Mondays", "a dentist in Graz", "the old laptop"]


def _fact(rng: random.Random, i: int) -> str:
    return (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"on day {rng.randint(1, 365)} (note {i}).")


def _query_from(rng: random.Random, fact: str) -> str:
    words = fact.split()
    if rng.random() < 0.5:
        words.pop(rng.randrange(len(words)))
    i = rng.randrange(len(words))
    word = words[i]
    if len(word) > 3:
        j = rng.randrange(1, len(word) - 1)
        words[i] = word[:j] + word[j + 1:]   # a dropped letter
    return " ".join(words)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


class _Timer:
    """Wall and CPU milliseconds of each timed block. CPU time (this process's) is what a shared, loaded
    machine distorts least; wall time is what a user waits (and includes fsync for writes)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> _Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall.append((time.perf_counter() - self._wall) * 1e3)
        self.cpu.append((time.process_time() - self._cpu) * 1e3)

    def result(self) -> tuple[float, float, float, float]:
        return (*_percentiles(self.wall), *_percentiles(self.cpu))


def build_db(path: Path, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    facts = [_fact(rng, i) for i in range(n)]
    with MemoryStore(path) as store:
        store.conn.execute("PRAGMA synchronous = OFF")   # set-up only: the measured writes use FULL
        for i, fact in enumerate(facts):
            store.add("alice", fact, slot=f"slot{i % 500}" if i % 4 == 0 else None,
                      session=f"s{i % 50}", kind="fact" if i % 4 == 0 else "note")
        for user in ("bob", "carol"):
            for i in range(n // 10):
                store.add(user, _fact(rng, i), kind="note")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return facts


def measure(path: Path, facts: list[str], queries: int, writes: int, seed: int) -> dict[str, tuple[float, ...]]:
    rng = random.Random(seed)
    results: dict[str, tuple[float, ...]] = {}
    texts = [_query_from(rng, rng.choice(facts)) for _ in range(queries)]
    with MemoryStore(path) as store:
        timer = _Timer()
        with timer:
            store.search("alice", texts[0])
        results["cold (first search after opening)"] = timer.result()
        for mode in ("fused", "bm25", "dense"):
            timer = _Timer()
            for text in texts:
                with timer:
                    store.search("alice", text, k=5, mode=mode)
            results[f"search {mode}"] = timer.result()
        timer = _Timer()
        for i in range(writes):
            text = _fact(rng, len(facts) + i)
            with timer:
                store.add("alice", text, slot=f"slot{i % 500}" if i % 2 == 0 else None, kind="fact")
        results["write (add)"] = timer.result()
        timer = _Timer()
        for text in texts[:50]:   # a search right after a write: the caches are kept current, not reloaded
            store.add("alice", _fact(rng, 0), kind="note")
            with timer:
                store.search("alice", text)
        results["search after a write"] = timer.result()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recall-seeds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="where to put the DB (default: a temporary directory)")
    parser.add_argument("--append", help="append the markdown section to this file (e.g. docs/benchmarks.md)")
    args = parser.parse_args()

    lines = [f"### Memory store ({datetime.date.today().isoformat()})", "",
             f"`{shlex.join(['python', 'bench/memory_store.py', *sys.argv[1:]])}`; {cpu_name()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, SQLite "
             f"{__import__('sqlite3').sqlite_version}, load average {os.getloadavg()[0]:.1f}", ""]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs = []
        for repeat in range(args.repeats):
            path = Path(tmp) / f"bench{repeat}.db"
            start = time.perf_counter()
            facts = build_db(path, args.memories, args.seed + repeat)
            print(f"repeat {repeat}: built {args.memories:,} memories in {time.perf_counter() - start:.1f}s "
                  f"({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
            runs.append(measure(path, facts, args.queries, args.writes, args.seed + repeat))
    lines += [f"{args.memories:,} memories of one user (+{2 * (args.memories // 10):,} of two others); median over "
              f"{args.repeats} repeats of each run's p50 / p95 (ms); CPU = this process's CPU time (a write's fsync "
              "wait is wall time only)", "",
              "| operation | p50 ms | p95 ms | CPU p50 ms | CPU p95 ms | target |", "|---|---:|---:|---:|---:|---|"]
    targets = {"search fused": "p95 <= 50", "write (add)": "<= 20"}
    for key in runs[0]:
        cells = " | ".join(f"{statistics.median(r[key][i] for r in runs):.2f}" for i in range(4))
        lines.append(f"| {key} | {cells} | {targets.get(key, '')} |")
    if args.recall_seeds:
        recalls = {mode: [] for mode in ("bm25", "dense", "fused")}
        for seed in range(1, args.recall_seeds + 1):
            retrieval_set = build_retrieval_set(seed)
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp, MemoryStore(Path(tmp) / "docs.db") as store:
                for name, text in retrieval_set.documents:
                    store.add_document("reader", name, text)
                for mode in recalls:
                    recalls[mode].append(recall_at_k(store, "reader", retrieval_set, k=5, mode=mode))
        n_questions = len(build_retrieval_set(1).questions)
        lines += ["", f"External retrieval, recall@5 over seeds 1-{args.recall_seeds} ({n_questions} questions and "
                  "60 documents each):", "", "| mode | mean | worst seed |", "|---|---:|---:|"]
        for mode, values in recalls.items():
            lines.append(f"| {mode} | {statistics.mean(values):.3f} | {min(values):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    append_markdown(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
