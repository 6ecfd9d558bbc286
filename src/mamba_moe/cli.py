"""The ``mamba-moe`` command: each subcommand delegates to the module that does the work."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from .cli_types import positive_int
from .config import PRESETS, ConfigError, MambaMoEConfig, get_preset

_SUBCOMMAND_MODULES: list[str] = ["mamba_moe.inference.cli", "mamba_moe.data.cli", "mamba_moe.training.cli",
                                   "mamba_moe.training.distill_cli", "mamba_moe.export.cli",
                                   "mamba_moe.evaluation.cli", "mamba_moe.growth.cli", "mamba_moe.growth.context_cli",
                                   "mamba_moe.memory.cli"]


def _load_config(args: argparse.Namespace) -> MambaMoEConfig:
    return MambaMoEConfig.load(args.config) if args.config else get_preset(args.preset)


def _describe(model, config: MambaMoEConfig, export_status: bool = True) -> None:
    from .export import export_blockers, export_caveats
    from .model.params import count_parameters, format_parameter_table

    layout = " ".join(("A" if m == "attention" else "M") + {"moe": "e", "dense": "d", "none": "-"}[f]
                      for m, f in zip(config.layer_mixers, config.layer_ffns, strict=True))
    print(f"layers ({config.n_layers}): {layout}   (M = Mamba2, A = attention; e = MoE, d = dense FFN, - = none)")
    print(format_parameter_table(count_parameters(model)))
    if not export_status:  # `info` prints the export tiers in full instead
        return
    blockers, caveats = export_blockers(config), export_caveats(config)
    status = "not exportable: " + "; ".join(map(str, blockers)) if blockers else "exportable"
    if caveats and not blockers:
        status += " (" + "; ".join(map(str, caveats)) + ")"
    print("GGUF (llama.cpp granitehybrid): " + status)


def cmd_info(args: argparse.Namespace) -> int:
    """A checkpoint (with its growth history, adapter and the file types its tensors fit) or a config/preset."""
    from .info import adapter_lines, export_tier_lines, history_lines
    from .model import MambaMoEForCausalLM

    if args.checkpoint is None:
        config = _load_config(args)
        with torch.device("meta"):  # sizes only: no memory, no init
            model = MambaMoEForCausalLM(config)
        _describe(model, config, export_status=False)
        print("\n".join(export_tier_lines(config)))
        return 0
    if args.config:
        raise ConfigError("--config: give a checkpoint or a model config, not both")
    from .checkpoint_dirs import resolve_model_dir

    directory = resolve_model_dir(args.checkpoint)  # a run folder: its newest complete checkpoint
    model = MambaMoEForCausalLM.from_pretrained(directory)
    print(f"checkpoint: {directory}")
    _describe(model, model.config, export_status=False)
    print("\n".join(adapter_lines(directory) + history_lines(directory) + export_tier_lines(model.config, model)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a model, print what it is made of, and generate from its (random) weights."""
    from .inference import greedy_generate
    from .model import MambaMoEForCausalLM

    torch.manual_seed(args.seed)
    config = _load_config(args)
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise ValueError(f"--prompt-tokens + --new-tokens: {args.prompt_tokens + args.new_tokens} tokens, more than "
                         f"the model's context of {config.max_position_embeddings}")
    start = time.perf_counter()
    model = MambaMoEForCausalLM(config).eval()
    print(f"built {args.config or args.preset} in {time.perf_counter() - start:.1f}s")
    _describe(model, config)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    start = time.perf_counter()
    with torch.inference_mode():
        model(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = greedy_generate(model, prompt, args.new_tokens)
    total = time.perf_counter() - start
    new = out[0, args.prompt_tokens:].tolist()
    print(f"prompt: {args.prompt_tokens} random token ids; prefill {args.prompt_tokens / prefill:.0f} tok/s")
    print(f"greedy continuation (random weights, so ids not text): {new}")
    print(f"generated {len(new)} tokens in {total:.2f}s ({len(new) / total:.1f} tok/s incl. prefill, "
          f"{torch.get_num_threads()} threads)")
    return 0


def cmd_convert_hf_mamba2(args: argparse.Namespace) -> int:
    from .convert import load_hf_mamba2

    model = load_hf_mamba2(args.source)
    model.save_pretrained(args.output)
    print(f"wrote {args.output} ({model.num_parameters():,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_model(p: argparse.ArgumentParser, default: str) -> argparse.ArgumentParser:
        p.add_argument("--preset", default=default, choices=sorted(PRESETS), help="named model preset")
        p.add_argument("--config", help="model config file (YAML or config.json); overrides --preset")
        return p

    info = with_model(sub.add_parser("info", help="parameter table, layout, growth history and export tiers of a "
                                                  "checkpoint or a model config"), "mamba-moe-300m")
    info.add_argument("checkpoint", nargs="?", help="checkpoint directory or run folder (default: --preset/--config)")
    info.set_defaults(func=cmd_info)

    demo = with_model(sub.add_parser("demo", help="build a model and generate from it (no download, CPU)"),
                      "mamba-moe-300m")
    demo.add_argument("--prompt-tokens", type=positive_int, default=32, help="random prompt length (default 32)")
    demo.add_argument("--new-tokens", type=positive_int, default=16, help="tokens to generate (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert-hf-mamba2", help="import a HF Mamba2ForCausalLM checkpoint directory")
    convert.add_argument("source")
    convert.add_argument("output")
    convert.set_defaults(func=cmd_convert_hf_mamba2)

    # Subsystems add their own subcommands: each module has register(subparsers).
    for module in _SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mamba-moe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
