"""``mamba-moe grow`` and ``mamba-moe lora merge``; ``register`` adds them to the main parser."""

from __future__ import annotations

import argparse
from typing import Any

from .experts import INITS


def register(subparsers: Any) -> None:
    grow = subparsers.add_parser(
        "grow", help="grow a checkpoint: more experts, more layers, dense FFNs into experts, another router",
        description="Grow a checkpoint into a new one (docs/growth.md). Every operation but --router leaves the "
                    "logits unchanged, which is checked before anything is written.")
    grow.add_argument("checkpoint", help="checkpoint directory (or a run folder: its newest complete checkpoint)")
    grow.add_argument("-o", "--output", required=True, help="directory to write (must not exist, see --overwrite)")
    op = grow.add_mutually_exclusive_group(required=True)
    op.add_argument("--add-experts", type=int, metavar="N",
                    help="N more routed experts per MoE layer (a multiple of the current count)")
    op.add_argument("--add-layers", type=int, metavar="N", help="N identity layers inserted before layer --at")
    op.add_argument("--dense-to-moe", type=int, metavar="E", help="upcycle dense FFNs into E copied experts")
    op.add_argument("--router", metavar="SPEC", help="new routing rule: topk:K, soft or switch (changes the output)")
    grow.add_argument("--init", choices=INITS, default="split",
                      help="--add-experts: split (exact, copies differ), copy (exact twins), noise (approximate)")
    grow.add_argument("--scale", type=float, help="--add-experts: relative size of the split offsets / noise")
    grow.add_argument("--domain", help="--add-experts: data-domain label for the first new expert")
    grow.add_argument("--at", type=int, help="--add-layers: insert before this layer (n_layers appends)")
    grow.add_argument("--mixer", choices=["mamba", "attention"], default="mamba", help="--add-layers: mixer kind")
    grow.add_argument("--ffn", choices=["moe", "dense", "none"],
                      help="--add-layers: FFN kind (default: that of the layer at --at)")
    grow.add_argument("--moe-router", metavar="SPEC", help="--dense-to-moe: soft or topk:K (default: the config's)")
    grow.add_argument("--expert-hidden", type=int, help="--dense-to-moe: expert width for layers without an FFN")
    grow.add_argument("--keep-empty", action="store_true",
                      help="--dense-to-moe: leave layers without an FFN as they are (default: give them silent MoE)")
    grow.add_argument("--eval", metavar="DATA", help="held-out shards (a `data prepare` folder) or text: loss before "
                                                     "and after (required by --router)")
    grow.add_argument("--seq-len", type=int, default=256, help="--eval window length (default 256)")
    grow.add_argument("--eval-windows", type=int, default=32, help="--eval windows (default 32)")
    grow.add_argument("--seed", type=int, default=0, help="seed of new weights and split offsets (default 0)")
    grow.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    grow.set_defaults(func=cmd_grow)

    lora = subparsers.add_parser("lora", help="LoRA adapters (PEFT format): merge one into its base",
                                 description="LoRA adapters saved in PEFT's format by mamba_moe.growth.lora.")
    sub = lora.add_subparsers(dest="lora_command", required=True)
    merge = sub.add_parser("merge", help="fold an adapter into its base checkpoint (before export)")
    merge.add_argument("base", help="the base checkpoint the adapter was trained on")
    merge.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors), or a "
                                          "LoRA training run (its newest checkpoint holds the adapter)")
    merge.add_argument("-o", "--output", required=True, help="directory to write the merged checkpoint to")
    merge.add_argument("--no-base-check", action="store_true",
                       help="skip the base-weights fingerprint check (the config must still match)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    merge.set_defaults(func=cmd_lora_merge)


def _operation(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from .common import GrowthError

    used = {"--init": args.init != "split", "--scale": args.scale is not None, "--at": args.at is not None,
            "--mixer": args.mixer != "mamba", "--ffn": args.ffn is not None,
            "--moe-router": args.moe_router is not None,
            "--expert-hidden": args.expert_hidden is not None, "--keep-empty": args.keep_empty}
    allowed = {"add_experts": {"--init", "--scale"}, "add_layers": {"--at", "--mixer", "--ffn"},
               "dense_to_moe": {"--moe-router", "--expert-hidden", "--keep-empty"}, "router": set()}
    if args.add_experts is not None:
        op, arguments = "add_experts", {"n_new": args.add_experts, "init": args.init, "scale": args.scale,
                                        "seed": args.seed}
    elif args.add_layers is not None:
        if args.at is None:
            raise GrowthError("at: --add-layers needs --at I (insert before layer I; n_layers appends)")
        op, arguments = "add_layers", {"n_new": args.add_layers, "at": args.at, "mixer": args.mixer, "ffn": args.ffn,
                                       "seed": args.seed}
    elif args.dense_to_moe is not None:
        op, arguments = "dense_to_moe", {"num_experts": args.dense_to_moe, "router": args.moe_router,
                                         "fill_empty": not args.keep_empty, "expert_hidden": args.expert_hidden,
                                         "seed": args.seed}
    else:
        op, arguments = "router", {"spec": args.router}
    stray = [flag for flag, on in used.items() if on and flag not in allowed[op]]
    if stray:
        raise GrowthError(f"{stray[0].lstrip('-').replace('-', '_')}: {stray[0]} does not apply to "
                          f"--{op.replace('_', '-')}")
    return op, arguments


def cmd_grow(args: argparse.Namespace) -> int:
    from .grow import grow_checkpoint

    op, arguments = _operation(args)
    report = grow_checkpoint(args.checkpoint, args.output, op, arguments, eval_data=args.eval, seq_len=args.seq_len,
                             eval_windows=args.eval_windows, overwrite=args.overwrite, domain=args.domain)
    print("\n".join(report.lines()))
    print(f"wrote {report.output}")
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    from .lora_merge import merge_checkpoint

    result = merge_checkpoint(args.base, args.adapter, args.output, check_base=not args.no_base_check,
                              overwrite=args.overwrite)
    print(f"merged {args.adapter} into {result['base']}: logits of merged vs adapted model, max rel. error "
          f"{result['max_rel_error']:.2e}")
    print(f"wrote {result['output']}")
    return 0
