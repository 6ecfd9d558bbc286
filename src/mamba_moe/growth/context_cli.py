"""``mamba-moe extend-context``: YaRN on (or off) in a trained checkpoint, or show what it has.

    mamba-moe extend-context runs/stage5_qat/final-quantized --show
    mamba-moe extend-context runs/stage5_qat/final-quantized --yarn 4 -o runs/final-yarn4
    mamba-moe extend-context runs/final-yarn4 --off -o runs/final-plain
"""

from __future__ import annotations

import argparse
from typing import Any

from ..cli_types import positive_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extend-context", help="switch YaRN on in a checkpoint trained with plain RoPE (or off again, or show it)",
        description="Write a copy of CHECKPOINT whose config.json has YaRN switched on (--yarn) or off (--off), "
                    "weights unchanged, the operation recorded in growth.json; or print its RoPE scaling and "
                    "trained length (--show). Train with plain RoPE, then switch YaRN on before export and "
                    "evaluation (docs/training.md, \"Long context\").")
    p.add_argument("checkpoint", help="checkpoint directory (or a run folder: its newest complete checkpoint)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--yarn", type=float, metavar="FACTOR",
                      help="YaRN factor > 1: the context becomes FACTOR times the trained length (4: 8k -> 32k)")
    mode.add_argument("--off", action="store_true",
                      help="back to plain RoPE; max_position_embeddings returns to what it was before --yarn (for a "
                           "scaling that was trained with: its original length)")
    mode.add_argument("--show", action="store_true",
                      help="print the RoPE scaling and the trained length; write nothing")
    p.add_argument("--original-length", type=positive_int, metavar="N",
                   help="--yarn: the length the model was trained at (default: the longest seq_len its training "
                        "runs recorded, followed back through --checkpoint starts and growth.json)")
    p.add_argument("-o", "--output", help="checkpoint directory to write (--yarn, --off); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_extend_context)


def cmd_extend_context(args: argparse.Namespace) -> int:
    from .common import GrowthError
    from .context import context_lines, extend_context, remove_context_scaling

    if args.show:
        for name, flag, used in (("output", "-o", args.output is not None),
                                 ("original_length", "--original-length", args.original_length is not None),
                                 ("overwrite", "--overwrite", args.overwrite)):
            if used:
                raise GrowthError(f"{name}: --show writes nothing; drop {flag}")
        print("\n".join(context_lines(args.checkpoint)))
        return 0
    mode = "--off" if args.off else "--yarn"
    if args.output is None:
        raise GrowthError(f"output: {mode} writes a new checkpoint; give its directory with -o OUT")
    if args.off:
        if args.original_length is not None:
            raise GrowthError("original_length: --original-length goes with --yarn (--off returns to the scaling's "
                              "own original length)")
        report = remove_context_scaling(args.checkpoint, args.output, overwrite=args.overwrite)
    else:
        report = extend_context(args.checkpoint, args.output, args.yarn, args.original_length,
                                overwrite=args.overwrite)
    print("\n".join(report.lines()))
    print(f"wrote {report.output}")
    return 0
