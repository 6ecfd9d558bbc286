"""``mamba-moe eval`` (this harness) and ``mamba-moe lm-eval`` (lm-evaluation-harness with our adapter).

``register`` adds both to the main parser (``mamba_moe/cli.py`` lists this module).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_types import positive_int
from .errors import EvalError


def register(subparsers: Any) -> None:
    from .tasks import TASK_NAMES

    ev = subparsers.add_parser(
        "eval", help="score a model on gsm8k, humaneval, mt-bench-local, ppl, passkey, mqar (offline)",
        description="Evaluate MODEL: our checkpoint directory, an HF causal-LM directory, a .gguf file, or "
                    "openai:URL. Writes DIR/report.json, DIR/report.md and DIR/samples/<task>.jsonl; a rerun "
                    "with the same DIR resumes. See docs/evaluation.md.")
    ev.add_argument("model", help="checkpoint dir, HF dir, model.gguf, or openai:http://host:port/v1")
    ev.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASK_NAMES)}")
    ev.add_argument("--limit", type=positive_int, default=None, help="first N items per task (default: all)")
    ev.add_argument("--output", default="eval-results", help="result folder (default eval-results)")
    ev.add_argument("--seed", type=int, default=0, help="fixes exemplars, synthetic data and sampling (default 0)")
    ev.add_argument("--chat", action="store_true", help="address the model with chat messages (instruct models)")
    ev.add_argument("--set", dest="sets", action="append", default=[], metavar="TASK.OPTION=VALUE",
                    help="task option, e.g. gsm8k.num_fewshot=5, passkey.lengths=1024,4096 or "
                         "mt-bench-local.judge=MODEL (repeatable)")
    ev.add_argument("--data-dir",
                    help="folder with gsm8k/ and mt_bench/ (default: $MAMBA_MOE_EVAL_DATA or ../shared/data)")
    ev.add_argument("--batch-size", type=positive_int, default=16, help="items per batch (and cache write)")
    ev.add_argument("--device", default="cpu", help="torch device for checkpoint/HF models (default cpu)")
    ev.add_argument("--dtype", default="float32", help="weights dtype for checkpoint/HF models (default float32)")
    ev.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    ev.add_argument("--openai-model", help="model id for openai:URL (default: the first the server lists)")
    ev.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ev.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight for openai:URL")
    ev.add_argument("--n-ctx", type=positive_int, default=None, help="context for GGUF models (default: the file's)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    lm = subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness's CLI with --model mamba-moe registered",
        description="Runs lm-evaluation-harness's own command line after registering our checkpoints as "
                    "--model mamba-moe, e.g.: mamba-moe lm-eval run --model mamba-moe --model_args "
                    "pretrained=DIR --tasks my_task --include_path tasks/")
    lm.add_argument("args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    lm.set_defaults(func=cmd_lm_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .backends import open_backend
    from .runner import parse_sets, run_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks: give at least one task")
    from .tasks import task_class

    for name in tasks:
        task_class(name)   # unknown names fail before the model loads
    options = parse_sets(args.sets, tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    def open_model(model: str, openai_model: str | None = None) -> Any:
        # a judge (mt-bench-local.judge=MODEL) opens with the same device, dtype, threads and context
        return open_backend(model, device=args.device, dtype=args.dtype, openai_model=openai_model,
                            api_key_env=args.api_key_env, concurrency=args.concurrency, n_ctx=args.n_ctx,
                            seed=args.seed, threads=args.threads)

    backend = open_model(args.model, args.openai_model)
    try:
        report = run_eval(backend, tasks, args.output, model=args.model, limit=args.limit, seed=args.seed,
                          chat=args.chat, options=options, data_dir=args.data_dir, batch_size=args.batch_size,
                          progress=not args.no_progress and sys.stderr.isatty(), open_model=open_model)
    finally:
        backend.close()
    for name, entry in report["tasks"].items():
        if entry.get("skipped"):
            print(f"{name}: skipped: {entry['skipped']}")
            continue
        lo, hi = entry["ci95"]
        value = "–" if entry["value"] is None else f"{entry['value']:.4f}"
        interval = "" if lo is None else f" [{lo:.4f}, {hi:.4f}]"
        print(f"{entry.get('title', name)}: {entry['metric']} {value}{interval} (n={entry['n']})")
    print(f"report: {args.output}/report.md")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .lm_eval_adapter import run_cli

    return run_cli(args.args)
