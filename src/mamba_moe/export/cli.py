"""``mamba-moe export …``: checkpoints to formats that tools nobody here wrote can run.

    mamba-moe export gguf runs/stage1/checkpoints/step-040000 -o model-q4_k_m.gguf --type q4_k_m
    mamba-moe export hf runs/stage1/checkpoints/step-040000 -o model-hf/
"""

from __future__ import annotations

import argparse
from typing import Any

from .llama_quant import FILE_TYPES


def register(subparsers: Any) -> None:
    """Add the ``export`` command and its subcommands to the ``mamba-moe`` parser."""
    export = subparsers.add_parser("export", help="export a checkpoint (GGUF for llama.cpp, transformers directory)",
                                   description="Export a checkpoint directory to another runtime's format.")
    sub = export.add_subparsers(dest="export_command", required=True)

    g = sub.add_parser("gguf", help="one GGUF file for stock llama.cpp (architecture granitehybrid)",
                       description="Write CHECKPOINT (config.json, model.safetensors, tokenizer) as a llama.cpp "
                                   "granitehybrid GGUF file. Quantized types use llama.cpp's own quantizer "
                                   "(needs llama-cpp-python: pip install 'mamba-moe[export]').")
    g.add_argument("checkpoint", help="checkpoint directory as `mamba-moe train` or save_pretrained writes it")
    g.add_argument("-o", "--output", required=True, help="the .gguf file to write (replaced atomically)")
    g.add_argument("--type", default="f32", choices=list(FILE_TYPES),
                   help="tensor type: f32 (default), f16, bf16, or a llama.cpp quant type")
    g.add_argument("--threads", type=int, default=0, help="quantizer threads (0 = all cores)")
    g.set_defaults(func=cmd_gguf)

    h = sub.add_parser("hf", help="a transformers GraniteMoeHybridForCausalLM directory (no remote code)",
                       description="Write CHECKPOINT as a GraniteMoeHybridForCausalLM directory (config.json, "
                                   "model.safetensors, tokenizer, chat template) that AutoModelForCausalLM and "
                                   "AutoTokenizer load with no remote code (also vLLM, lm-eval --model hf, PEFT).")
    h.add_argument("checkpoint", help="checkpoint directory as `mamba-moe train` or save_pretrained writes it")
    h.add_argument("-o", "--output", required=True, help="the directory to write (replaced atomically)")
    h.set_defaults(func=cmd_hf)


def cmd_gguf(args: argparse.Namespace) -> int:
    from ..checkpoint_dirs import resolve_model_dir
    from ..config import MambaMoEConfig
    from .gguf_export import export_gguf
    from .granite_rules import export_caveats

    report = export_gguf(args.checkpoint, args.output, args.type, threads=args.threads)
    print(f"wrote {report.path} ({report.type}, {report.bytes / 2**20:.1f} MiB, {report.tensors} tensors, "
          f"{report.parameters:,} parameters) in {report.seconds:.1f}s")
    config = MambaMoEConfig.load(resolve_model_dir(args.checkpoint, notify=None) / "config.json")
    for caveat in export_caveats(config):
        print(f"note: {caveat}")
    return 0


def cmd_hf(args: argparse.Namespace) -> int:
    from .hf_export import export_hf

    report = export_hf(args.checkpoint, args.output)
    print(f"wrote {report.path} (GraniteMoeHybridForCausalLM, {report.tensors} tensors, "
          f"{report.parameters:,} parameters)")
    return 0
