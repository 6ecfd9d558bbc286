"""``mamba-moe data …``: train-tokenizer, prepare, inspect, memory-dialogues; ``register`` adds them to the parser."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..cli_types import non_negative_int, positive_int
from .config import DataError, PrepareConfig, SourceConfig


def register(subparsers: Any) -> None:
    """Add the ``data`` command and its subcommands to the ``mamba-moe`` parser."""
    data = subparsers.add_parser("data", help="tokenizer training, corpus preparation and shard inspection",
                                 description="Data pipeline: tokenizer, token shards, inspection.")
    sub = data.add_subparsers(dest="data_command", required=True)

    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE (llama-bpe pre-tokenizer) and save it",
                        description="Train a tokenizer on files/folders/globs, on the sources of a prepare "
                                    "config, or (with neither) on the Python standard library.")
    tt.add_argument("inputs", nargs="*", help="text files, folders or globs (each file one document)")
    tt.add_argument("--config", help="use the sources of this prepare config (YAML)")
    tt.add_argument("--output", required=True, help="directory to write (loadable with AutoTokenizer)")
    tt.add_argument("--vocab-size", type=int, default=32000)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--max-mb", type=float, default=None, help="stop reading after this much text")
    tt.add_argument("--glob", default="**/*", help="pattern for folders given as inputs")
    tt.set_defaults(func=cmd_train_tokenizer)

    prep = sub.add_parser("prepare", help="tokenize a corpus mixture into token shards with a manifest",
                          description="Tokenize the sources of a YAML config into shards (re-runs skip "
                                      "finished shards).")
    prep.add_argument("--config", required=True, help="prepare config (YAML); see configs/data/")
    prep.add_argument("--output", help="override the config's output folder")
    prep.add_argument("--workers", type=int, help="override the config's worker count (0 = one per core)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)

    ins = sub.add_parser("inspect", help="counts, domains, skips and a decoded sample of a prepared folder")
    ins.add_argument("path", help="folder written by `data prepare`")
    ins.add_argument("--split", default="train", choices=["train", "val"])
    ins.add_argument("--tokenizer", help="tokenizer for decoding (default: the one named in the manifest)")
    ins.add_argument("--sample-tokens", type=non_negative_int, default=200,
                     help="length of the decoded sample (0: counts only)")
    ins.add_argument("--seed", type=int, default=None, help="pick the sample document with this seed")
    ins.set_defaults(func=cmd_inspect)

    md = sub.add_parser("memory-dialogues", help="seeded multi-session chats with gold answers (stage-4 memory)",
                        description="Write multi-session conversations (facts, updates, corrections, deletions, "
                                    "other people, relative dates, chit-chat) with probes and gold answers, one "
                                    "chat per JSONL line (data.source: chat). Training seeds are 0..999999; the "
                                    "held-out seeds the memory evaluation reads are refused here unless --split "
                                    "eval. See docs/memory.md.")
    md.add_argument("--seed", type=int, default=0, help="the seed (train: 0..999999, eval: 1000000..1999999)")
    md.add_argument("--conversations", type=positive_int, default=100, help="conversations to write (default 100)")
    md.add_argument("--sessions", type=positive_int, default=50, help="sessions per conversation (default 50)")
    md.add_argument("--split", choices=["train", "eval"], default="train", help="seed range (default train)")
    md.add_argument("--format", dest="row_format", choices=["dialogue", "reader"], default="dialogue",
                    help="dialogue: one whole conversation a row; reader: one probe a row, its facts in a system "
                         "message as the memory's model reader writes them (default dialogue)")
    md.add_argument("--hard-negatives", type=float, default=0.0, metavar="P",
                    help="reader format: the share of rows that also list the asked attribute of another person, "
                         "with another value (0..1, default 0; docs/memory.md)")
    md.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    md.set_defaults(func=cmd_memory_dialogues)


# ---- train-tokenizer ------------------------------------------------------------------------------

def _training_texts(args: argparse.Namespace) -> tuple[Iterator[str], Any]:
    from .sources import SkipLog, iter_documents

    log = SkipLog()
    if args.config and args.inputs:
        raise DataError("train-tokenizer: give input paths or --config, not both")
    if args.config:
        sources = PrepareConfig.load(args.config).sources
    elif args.inputs:
        sources = [SourceConfig(name="inputs", kind="files", paths=list(args.inputs), glob=args.glob)]
    else:
        sources = [SourceConfig(name="stdlib", kind="stdlib", domain="code")]
    from .sources import check_source

    for i, source in enumerate(sources):
        source.validate(f"sources[{i}]")
        check_source(source, f"sources[{i}]")
    budget = int(args.max_mb * 1e6) if args.max_mb else None

    def texts() -> Iterator[str]:
        used = 0
        for source in sources:
            for doc in iter_documents(source, log):
                # chats: train on the contents; the turn markers are special tokens already
                text = doc.text if doc.text is not None else "\n".join(m["content"] for m in doc.messages or [])
                used += len(text.encode("utf-8", "surrogatepass"))
                yield text
                if budget is not None and used >= budget:
                    return

    return texts(), log


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import time

    from .tokenizer import llama_cpp_pre_name, save_tokenizer, tokenizer_hash, train_tokenizer

    texts, log = _training_texts(args)
    start = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          show_progress=sys.stderr.isatty())
    path = save_tokenizer(tok, args.output)
    print(f"wrote {path}: {len(tok)} tokens (asked {args.vocab_size}), pre-tokenizer "
          f"{llama_cpp_pre_name(tok)!r} for llama.cpp, hash {tokenizer_hash(tok)[:16]}…, "
          f"{time.perf_counter() - start:.1f}s")
    for line in log.lines():
        print("  " + line)
    return 0


# ---- prepare --------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    config = PrepareConfig.load(args.config)
    if args.output:
        config.output = args.output
    if args.workers is not None:
        config.workers = args.workers
    if args.no_progress:
        config.progress = False
    config.validate()
    result = prepare(config)
    print(result.report())
    return 0


# ---- inspect --------------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .shards import check_tokenizer, load_manifest

    root = Path(args.path)
    m = load_manifest(root)
    t = m["tokenizer"]
    print(f"{root}: {m['format']} v{m['version']}, {m['dtype']} tokens, created {m.get('created', '?')}")
    print(f"tokenizer: {t['path']} (hash {t['hash'][:16]}…, vocab {t['vocab_size']}, eos id {t['eos_id']}, "
          f"llama.cpp pre {t.get('llama_cpp_pre')!r})")
    print(f"split: seed {m['seed']}, val_fraction {m['val_fraction']}; dedup {'on' if m['dedup'] else 'off'}")
    header = f"{'source':<16} {'domain':<8} {'weight':>6} {'train docs':>11} {'train tokens':>14} " \
             f"{'val docs':>9} {'val tokens':>11} {'shards':>6}"
    print(header)
    for s in m["sources"]:
        print(f"{s['name']:<16} {s['domain']:<8} {s['weight']:>6g} {s['train']['docs']:>11,} "
              f"{s['train']['tokens']:>14,} {s['val']['docs']:>9,} {s['val']['tokens']:>11,} "
              f"{s['train']['shards'] + s['val']['shards']:>6}")
    for split in ("train", "val"):
        doms = ", ".join(f"{d} {v['tokens']:,} ({v['docs']:,} docs)"
                         for d, v in sorted(m["totals"][split]["by_domain"].items()))
        print(f"{split}: {m['totals'][split]['tokens']:,} tokens in {m['totals'][split]['docs']:,} docs"
              + (f" — {doms}" if doms else ""))
    skips = m["skips"]
    for kind in ("skipped", "notes"):
        for source, reasons in skips[kind].items():
            for reason, info in reasons.items():
                print(f"{kind}: {source}: {info['count']} x {reason} (e.g. {info['examples'][0]})")

    if args.sample_tokens == 0:
        return 0
    shards = [s for s in m["shards"] if s["split"] == args.split and s["n_docs"]]
    if not shards:
        print(f"no {args.split} documents to sample")
        return 0
    rng = random.Random(args.seed)
    shard = rng.choice(shards)
    offsets = np.load(root / f"{shard['stem']}.idx.npy", mmap_mode="r")
    doc = rng.randrange(shard["n_docs"])
    tokens = np.memmap(root / f"{shard['stem']}.bin", dtype=m["dtype"], mode="r")
    ids = tokens[int(offsets[doc]):int(offsets[doc + 1])][:args.sample_tokens].tolist()
    print(f"\nsample: {shard['stem']} document {doc} ({shard['domain']}), first {len(ids)} tokens:")
    decoded = _decode(args.tokenizer or t["path"], ids, m, check_tokenizer)
    print(decoded)
    return 0


def _decode(path: str, ids: list[int], manifest: dict[str, Any], check: Any) -> str:
    from .tokenizer import TokenizerError, load_tokenizer, tokenizer_hash

    try:
        tok = load_tokenizer(path)
    except TokenizerError as err:
        return f"(cannot decode: {err})\nids: {ids}"
    check(manifest, tokenizer_hash(tok), f"tokenizer {path}")
    return tok.decode(ids, skip_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    """Run the data commands alone (``python -m mamba_moe.data.cli …``)."""
    parser = argparse.ArgumentParser(prog="mamba-moe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"mamba-moe data {args.data_command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())



# ---- memory-dialogues -----------------------------------------------------------------------------

def cmd_memory_dialogues(args: argparse.Namespace) -> int:
    from collections import Counter

    from .memory_dialogues import DialogueConfig, generate, write_rows

    conversations = generate(args.seed, args.conversations, split=args.split,
                             config=DialogueConfig(sessions=args.sessions))
    path = write_rows(conversations, args.out, args.row_format, hard_negatives=args.hard_negatives)
    kinds = Counter(p.kind for c in conversations for p in c.probes)
    print(f"wrote {path}: {len(conversations)} conversations of {args.sessions} sessions ({args.split} seed "
          f"{args.seed}), probes: " + ", ".join(f"{k} {kinds[k]}" for k in ("recall", "latest", "abstain", "deleted")))
    return 0
