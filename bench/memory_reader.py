"""The memory evaluation's model-reader row from a small reader trained here (docs/memory.md, issue 19).

    python bench/memory_reader.py                        # data, tokenizer, training, then eval seeds 0 1 2
    python bench/memory_reader.py --config configs/train/memory_reader_gpu.yaml --conversations 10000 \
        --hard-negatives 0.5 --time-limit 420 --device cuda   # the GPU reader (its config's header)
    python bench/memory_reader.py --skip-train           # evaluate (and break down) an existing run
    python bench/memory_reader.py --eval-seeds 0 --eval-conversations 5
    python bench/memory_reader.py --config configs/train/memory_reader_gpu.yaml --conversations 10000 \
        --hard-negatives 0.5 --device cuda --training-seeds 0 1 --eval-seeds 3 4   # two trainings at once

Not a test and not run in CI: the CPU reader trains for ~15 minutes (at most 17: ``--time-limit``). Every step is the
command a user runs, timed:

1. ``mamba-moe data memory-dialogues --format reader``: one probe a row in the model reader's prompt, from
   *training* seeds (the evaluation reads the held-out seeds 1 000 000 + s);
2. ``mamba-moe data train-tokenizer`` on those rows' text (the checkpoint carries it; the evaluation's model
   reader encodes its prompts with the checkpoint's own tokenizer);
3. ``mamba-moe train --config configs/train/memory_reader_cpu.yaml``;
4. ``mamba-moe eval RUN --tasks memory --chat --set memory.reader=model`` per evaluation seed (and
   ``memory.reader=choice`` with ``--readers model choice``: the same prompt, the model's most likely shown
   value or abstention), and ``memory.reader=oracle`` (the store and retrieval alone) beside them;
5. the wrong answers counted by why they are wrong (the report's ``failures``), with a few examples each.

The model is a small reader trained only on the reader task, not the 300M chat model of stage 4: its
numbers say what a model of this size learns of the reading step in a CPU budget, nothing about stage 4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/train/memory_reader_cpu.yaml"   # --config configs/train/memory_reader_gpu.yaml on a GPU
KINDS = ("recall", "latest", "abstain", "deleted")


def run(cmd: list[str], log: Path) -> float:
    """Run one command from the repository root, its output teed to ``log``; the wall seconds it took."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if not line.startswith("step ") or "val loss" in line:   # per-step lines: the log only
                print("  " + line, end="", flush=True)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"failed with exit code {code} after {seconds:.0f}s (log: {log})")
    print(f"  ({seconds:.1f}s wall)", flush=True)
    return seconds


def run_all(jobs: list[tuple[list[str], Path]]) -> list[float]:
    """Run commands at once (each as ``run`` does, its output to its log only); the wall seconds of each. A small
    reader's training step is launch-bound, so two trainings share one GPU at ~1.3x the throughput of one."""
    if len(jobs) == 1:
        return [run(*jobs[0])]
    procs = []
    for cmd, log in jobs:
        print("$ " + shlex.join(cmd) + f"  &  (log: {log})", flush=True)
        with open(log, "w") as out:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), log,
                          time.perf_counter()))
    seconds, failed = [], []
    for proc, log, start in procs:
        code = proc.wait()
        seconds.append(time.perf_counter() - start)
        if code:
            failed.append(f"{log} (exit code {code})")
    if failed:
        raise SystemExit("failed: " + ", ".join(failed))
    print(f"  ({', '.join(f'{t:.1f}s' for t in seconds)} wall)", flush=True)
    return seconds


def pooled(entries: list[dict], key: str | None = None) -> tuple[int, int]:
    """(right, n) of a rate over several evaluation seeds' report entries."""
    right = n = 0
    for entry in entries:
        value = entry if key is None else entry[key]
        if value["value"] is not None:
            right += round(value["value"] * value["n"])
            n += value["n"]
    return right, n


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mamba_moe", *args]


def write_tokenizer_text(rows_path: Path, text_path: Path, max_rows: int) -> int:
    """The message contents of the first ``max_rows`` reader rows as one text file (what the BPE learns
    from: the reader's prompt, the facts, the questions and the answers); the rows written."""
    chunks = []
    with open(rows_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= max_rows:
                break
            chunks.append("\n".join(m["content"] for m in json.loads(line)["messages"]))
    tmp = text_path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
    os.replace(tmp, text_path)
    return len(chunks)


def rate(entry: dict, key: str | None = None) -> str:
    value = entry if key is None else entry[key]
    if value["value"] is None:
        return "–"
    return f"{value['value']:.3f} ({value['n']})"


def table_row(label: str, seed: int, entry: dict) -> str:
    probes = sum(entry[k]["n"] for k in ("latest", "abstention", "deleted")) + entry["n"]
    return (f"| {label} | {seed} | {probes} | {rate(entry)} | {rate(entry, 'latest')} | "
            f"{entry['stale_rate']['value']:.3f} | {rate(entry, 'abstention')} | {rate(entry, 'deleted')} | "
            f"{entry['deleted_leaks']} | {entry['gold_in_prompt']['value']:.3f} ({entry['gold_in_prompt']['n']}) |")


def breakdown(eval_dir: Path, examples: int) -> list[str]:
    """Counts of wrong answers by probe kind and failure, with a few examples of each failure."""
    records = [json.loads(line) for line in (eval_dir / "samples" / "memory.jsonl").read_text().splitlines()]
    lines, shown = [], {}
    by_kind: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    for r in records:
        failure = r["verdict"].get("failure")
        if failure:
            by_kind[r["meta"]["kind"]][failure] = by_kind[r["meta"]["kind"]].get(failure, 0) + 1
            shown.setdefault(failure, []).append(r)
    for kind in KINDS:
        n = sum(r["meta"]["kind"] == kind for r in records)
        wrong = by_kind[kind]
        parts = ", ".join(f"{f} {c}" for f, c in sorted(wrong.items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"  {kind}: {sum(wrong.values())} wrong of {n}: {parts}")
    for failure, rs in sorted(shown.items()):
        lines.append(f"  {failure}, e.g.:")
        for r in rs[:examples]:
            facts = [f[2:] for f in r["messages"][0]["content"].split("\n") if f.startswith("- ")]
            lines.append(f"    {r['meta']['kind']}: {r['meta']['slot']!r} gold {r['target']!r}, answered "
                         f"{r['verdict']['answer']!r}; prompt facts: {facts}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG, help="the reader's training config (the GPU one: "
                    "configs/train/memory_reader_gpu.yaml)")
    ap.add_argument("--out", default="runs/memory_reader", help="where data, tokenizer, run and evals go")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the reader rows (0..999999)")
    ap.add_argument("--conversations", type=int, default=2500, help="training conversations (~14 rows each)")
    ap.add_argument("--sessions", type=int, default=8, help="sessions per training conversation")
    ap.add_argument("--hard-negatives", type=float, default=0.0, metavar="P",
                    help="share of reader rows that also list the asked attribute of another person "
                         "(mamba-moe data memory-dialogues --hard-negatives)")
    ap.add_argument("--vocab-size", type=int, default=400, help="tokenizer size (the config explains 400)")
    ap.add_argument("--tokenizer-rows", type=int, default=10000, help="reader rows the tokenizer learns from")
    ap.add_argument("--time-limit", type=float, default=1020,
                    help="mamba-moe train --time-limit: stop training after this many seconds (default 17 minutes, "
                         "so data + tokenizer + training stay within 20 on a loaded machine)")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-conversations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation")
    ap.add_argument("--device", default="cpu", help="torch device of the evaluation (cuda on a GPU)")
    ap.add_argument("--examples", type=int, default=3, help="wrong answers shown per failure")
    ap.add_argument("--skip-data", action="store_true", help="reuse OUT's rows and tokenizer (made here or by an "
                    "earlier run) and train on them")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT's data, tokenizer and run")
    ap.add_argument("--skip-oracle", action="store_true", help="evaluate the model's readers only")
    ap.add_argument("--readers", nargs="+", choices=("model", "choice"), default=["model"],
                    help="how the trained model answers: model (greedy, what a chat does) and/or choice (the most "
                         "likely of the shown values and I don't know: splits its misses into choosing and copying)")
    ap.add_argument("--training-seeds", type=int, nargs="+", metavar="SEED",
                    help="train one reader per seed (the train config's seed: initialisation, batch order and which "
                         "0.5%% of the rows it keeps for validation), all at once, from the same rows file; each is "
                         "evaluated and its recall pooled over the evaluation seeds (default: one, the config's seed)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="extra mamba-moe train overrides")
    args = ap.parse_args()

    out = ROOT / args.out
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    rows = out / "data" / "reader.jsonl"
    text = out / "data" / "tokenizer-text.txt"
    tokenizer = out / "tokenizer"
    seeds = args.training_seeds or [None]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--training-seeds: each seed once, got {seeds}")
    # one training keeps the directory names of earlier runs (model, eval-model-seedS)
    models = {t: out / ("model" if t is None else f"model-seed{t}") for t in seeds}
    rel = lambda p: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)   # noqa: E731
    reader_name = Path(args.config).stem          # the table's label of the model-reader rows
    print(f"# memory reader {args.config}: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    times: dict[str, float] = {}
    if args.skip_data and not args.skip_train:
        missing = [rel(p) for p in (rows, tokenizer) if not p.exists()]
        if missing:
            raise SystemExit(f"--skip-data: {', '.join(missing)} not found (make them with `mamba-moe data "
                             "memory-dialogues` and `mamba-moe data train-tokenizer`, or run once without it)")
        print(f"  --skip-data: training on {rel(rows)} and {rel(tokenizer)} as they are; the data options "
              "(--seed, --conversations, --sessions, --hard-negatives, --vocab-size, --tokenizer-rows) are not used")
    if not args.skip_train and not args.skip_data:
        times["data"] = run(cli("data", "memory-dialogues", "--seed", str(args.seed), "--conversations",
                                str(args.conversations), "--sessions", str(args.sessions), "--format", "reader",
                                "--hard-negatives", str(args.hard_negatives), "--out", rel(rows)),
                            out / "logs" / "data.log")
        start = time.perf_counter()
        n = write_tokenizer_text(rows, text, args.tokenizer_rows)
        times["tokenizer text"] = time.perf_counter() - start
        print(f"  tokenizer text: {n} rows -> {rel(text)}")
        times["tokenizer"] = run(cli("data", "train-tokenizer", rel(text), "--output", rel(tokenizer),
                                     "--vocab-size", str(args.vocab_size)), out / "logs" / "tokenizer.log")
    if not args.skip_train:
        jobs = []
        for t, model in models.items():
            train = cli("train", "--config", args.config, f"data.path={rel(rows)}", f"data.tokenizer={rel(tokenizer)}",
                        f"output={rel(model)}", "progress=false", *([] if t is None else [f"seed={t}"]),
                        *args.overrides)
            if args.time_limit:
                at = train.index("train") + 1
                train[at:at] = ["--time-limit", str(args.time_limit)]
            jobs.append((train, out / "logs" / ("train.log" if t is None else f"train-seed{t}.log")))
        times["train"] = max(run_all(jobs))
        total = sum(times.values())
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        print(f"{' + '.join(times)}: {total:.0f}s wall ({parts})")

    def job(reader: str, t: int | None, model: Path, seed: int) -> tuple[list[str], Path, Path]:
        """The evaluation command of one reader on one seed, its log, and its output directory."""
        name = f"eval-{reader}-seed{seed}" + ("" if t is None or reader == "oracle" else f"-training{t}")
        cmd = cli("eval", rel(model), "--tasks", "memory", "--seed", str(seed), "--set", f"memory.reader={reader}",
                  "--set", f"memory.conversations={args.eval_conversations}", "--threads", str(args.threads),
                  "--device", args.device, "--output", rel(out / name), "--no-progress")
        if reader != "oracle":
            cmd.insert(cmd.index("--seed"), "--chat")
        return cmd, out / "logs" / f"{name}.log", out / name

    results = []   # (reader, training seed, eval seed, entry, eval dir, seconds)
    for seed in args.eval_seeds:
        # the trainings' model readers at once; the oracle (the store and retrieval alone, one evaluation
        # whatever the trainings) after them, so a single training's timings are those of one process
        groups = [[(reader, t, job(reader, t, model, seed)) for t, model in models.items()]
                  for reader in dict.fromkeys(args.readers)]
        if not args.skip_oracle:
            groups.append([("oracle", None, job("oracle", None, next(iter(models.values())), seed))])
        for group in groups:
            seconds = run_all([(cmd, log) for _, _, (cmd, log, _) in group])
            for (reader, t, (_, _, eval_dir)), wall in zip(group, seconds, strict=True):
                entry = json.loads((eval_dir / "report.json").read_text())["tasks"]["memory"]
                results.append((reader, t, seed, entry, eval_dir, wall))

    def label(reader: str, t: int | None) -> str:
        if reader == "oracle":
            return "oracle"
        return f"{reader}: {reader_name}" + ("" if t is None else f" (training seed {t})")

    print("\n| reader | eval seed | probes | recall | latest | stale | abstention | deleted | deleted leaks | "
          "gold in prompt |\n|---|---|---|---|---|---|---|---|---|---|")
    for reader, t, seed, entry, _, _ in results:
        print(table_row(label(reader, t), seed, entry))
    print("\nPooled over the evaluation seeds " + " ".join(map(str, args.eval_seeds)) + ":\n\n"
          "| reader | recall | latest | abstention |\n|---|---|---|---|")
    for reader, t in dict.fromkeys((r[0], r[1]) for r in results):
        entries = [r[3] for r in results if (r[0], r[1]) == (reader, t)]
        cells = [pooled(entries, key) for key in (None, "latest", "abstention")]
        print(f"| {label(reader, t)} | " + " | ".join(f"{a}/{b} = {a / b:.3f}" if b else "–" for a, b in cells) + " |")
    for reader, t, seed, entry, eval_dir, seconds in results:
        if reader == "oracle":
            continue
        tokens = entry["conversation_tokens"]
        print(f"\n{label(reader, t)}, seed {seed} ({seconds:.0f}s; conversations {tokens['min']}-{tokens['max']} "
              f"{entry['token_unit']}, context {entry['max_context']}): wrong answers")
        print("\n".join(breakdown(eval_dir, args.examples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
