"""``mamba-moe train --config FILE [--checkpoint DIR] [--resume] [key=value ...]``: run a training config.

After training it prints the numbers that say whether the model learned anything: final validation loss and
perplexity beside the unigram entropy of the training tokens, and a generated sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from ..cli_types import positive_float


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML training config (see configs/train/)",
                              description="Train from a YAML config; key=value overrides use dotted keys "
                                          "(e.g. lr=1e-3 model.overrides.d_model=256 data.max_docs=50).")
    p.add_argument("--config", required=True, help="training config (YAML), e.g. configs/train/demo.yaml")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="start from these weights (a checkpoint dir, or a run's output folder: its newest "
                        "checkpoint); the model config comes from it, optimizer/schedule/step start fresh")
    p.add_argument("--resume", action="store_true",
                   help="continue this run (its output folder) exactly from its newest checkpoint")
    p.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                   help="stop at the first step after SECONDS of training, save a checkpoint there and exit 0; "
                        "continue with --resume (for GPU time that comes in fixed slices)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .report import sample_text, unigram_entropy, unigram_entropy_of
    from .run_lock import OutputInUse
    from .trainer import Trainer, TrainingDiverged

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.checkpoint:
        cfg.init_from = args.checkpoint
    start = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"preparing data ({cfg.data.source}) …", flush=True)
    try:
        trainer.setup()
    except OutputInUse as err:
        print(f"mamba-moe train: error: {err}", file=sys.stderr)
        return 2
    model = trainer.model
    if trainer.dist.is_main:
        start_from = f"; weights from {trainer.init_dir}" if trainer.init_dir else ""
        extras = [name for name, on in (("QAT", cfg.qat), ("distillation", cfg.distill),
                                        ("domain routing", cfg.domain_routing),
                                        ("activation checkpointing", cfg.activation_checkpointing)) if on]
        if cfg.lora is not None:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            extras.append(f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}: {trained:,} trained "
                          "parameters, the base frozen")
        print(f"model: {model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active); "
              f"device {trainer.device}; {trainer.data.describe()}; data-parallel processes: "
              f"{trainer.dist.world_size} ({trainer.parallel}){start_from}"
              + (f"; {', '.join(extras)}" if extras else ""), flush=True)
    try:
        result = trainer.train(resume=args.resume, time_limit_s=args.time_limit)
    except TrainingDiverged as err:
        print(f"mamba-moe train: {err}", file=sys.stderr)
        return 1
    except OutputInUse as err:
        print(f"mamba-moe train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer.dist.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not trainer.dist.is_main:
        return 0
    entropy = (unigram_entropy(trainer.shards, "train") if trainer.shards is not None
               else unigram_entropy_of(trainer.data.trained_token_ids()))
    losses = result.losses
    if losses:
        k = max(1, min(10, len(losses) // 4))
        print(f"train loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}")
    if result.val:
        verdict = "below" if result.val["val_loss"] < entropy else "NOT below"
        print(f"final validation loss {result.val['val_loss']:.3f} nats/token (perplexity {result.val['val_ppl']:.1f})"
              f" vs unigram entropy of the training tokens {entropy:.3f} nats: {verdict} "
              f"(by {entropy - result.val['val_loss']:.3f})")
    else:
        print(f"unigram entropy of the training tokens: {entropy:.3f} nats/token (no validation split)")
    print(f"checkpoint: {result.checkpoint} (model + tokenizer + trainer state)")
    if result.stopped_early:
        print(f"stopped by --time-limit at step {result.step} of {cfg.max_steps}; continue with: "
              f"{_train_command(trainer.dist.world_size)} --config {args.config} --resume"
              + "".join(f" {o}" for o in args.overrides), flush=True)
    if result.quantized:
        print(f"QAT: quantized weights (convert_qat) in {result.quantized}")
    if cfg.sample_tokens:
        print(f"sample ({cfg.sample_tokens} tokens, temperature 0.7, top-k 40):")
        model = trainer.inference_model(result.checkpoint)
        with torch.compiler.set_stance("force_eager"):  # decode shapes change every step: no recompiles
            print(sample_text(model, trainer.tokenizer, cfg.sample_prompt, cfg.sample_tokens, trainer.device,
                              seed=cfg.seed))
    print(f"wall time {time.perf_counter() - start:.0f}s; {result.tokens_per_s:.0f} train tokens/s", flush=True)
    return 0


def _train_command(world_size: int) -> str:
    """How this run was started: ``mamba-moe train``, or torchrun's launch for one machine (several machines:
    their own torchrun options, not known here, so only the part after them)."""
    import os
    import shlex

    from .distributed import launch_command

    if world_size == 1:
        return "mamba-moe train"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:
        return shlex.join(launch_command(world_size))
    return "torchrun <the same options> " + shlex.join(launch_command(world_size)[-3:])


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
