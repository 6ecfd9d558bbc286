"""The recipe measured on a GPU (issue 21): hybrid-MoE vs dense vs transformer at equal tokens, long context,
QAT. Every phase is resumable and skips what is done, so the study runs in slices of GPU time:

    python bench/study.py all --time-limit 540           # prepare, train, longctx, qat, collect: what fits
    python bench/study.py all --model hybrid-topk ...    # longctx + qat from another model (*.hybrid-topk.json)
    python bench/study.py prepare                        # tokenizer + shards of this Python installation
    python bench/study.py train --models hybrid-soft transformer --time-limit 540
    python bench/study.py longctx                        # loss by position at 8k/16k/32k, YaRN off and on
    python bench/study.py qat                            # QAT vs its control; fake-quant and GGUF Q4 losses
    python bench/study.py collect                        # copy metrics + results into docs/results/study/
    python bench/study.py plot                           # PNGs + tables from docs/results/study/ (no GPU)

Each model is one ordinary training run, ``mamba-moe train --config configs/study/train.yaml`` with the
model's overrides (``MODELS``) and ``output=runs/study/NAME``; the driver only adds ``--resume`` and a
``--time-limit`` so a run cut by the slice continues exactly (the trainer's resume) in the next. The curves
are the trainer's own ``metrics.jsonl``; results of the other phases are JSON files beside them. What is in
``docs/results/study/`` is what ``plot`` reads, so the plots are rebuilt from committed files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

TRAIN_CONFIG = "configs/study/train.yaml"
QAT_CONFIG = "configs/study/qat.yaml"
DATA_CONFIG = "configs/data/study.yaml"
TOKENIZER = "data/tokenizers/stdlib-32k"
SHARDS = "data/shards/study"
RUNS = Path("runs/study")
RESULTS = Path("docs/results/study")

# Plain RoPE for training: YaRN's scaling is static (the same frequencies at every position), so a model
# trained with it on has never seen the angles that lie past its training length; the long-context phase
# switches YaRN on afterwards, as the seed's "train 8k, run 32k" means.
_NO_YARN = "model.overrides.rope_scaling=null"
# The study's first four models were trained when the flagship had 16 diff2 heads; they keep them, so their
# committed curves stay reproducible. The preset has 8 since 2026-12-04 (the hybrid-soft-*-960 pair decided it).
_H16, _H8 = "model.overrides.attn_num_heads=16", "model.overrides.attn_num_heads=8"
_LONG = "max_steps=960"     # twice the study's tokens: 62.9M
MODELS: dict[str, list[str]] = {
    # the flagship as it was: 20 Mamba2 + 4 diff2 attention layers (16 heads), soft MoE (6 x 256 + shared 512)
    "hybrid-soft": ["model.preset=mamba-moe-300m", _NO_YARN, _H16],
    # the same with top-2 routing: 2 of 6 routed experts per token (+ the shared one)
    "hybrid-topk": ["model.preset=mamba-moe-300m", _NO_YARN, _H16, "model.overrides.moe_router=topk",
                    "model.overrides.moe_top_k=2"],
    # the same with a dense SwiGLU FFN of the soft MoE's active width (6 x 256 + 512 = 2048)
    "hybrid-dense": ["model.preset=mamba-moe-300m-dense", _NO_YARN, _H16],
    # a Llama-style transformer: 24 x 1024, 16-head RoPE attention, SwiGLU 2816, untied head
    "transformer": ["model.preset=transformer-baseline"],
    # 8 diff2 heads instead of 16 (16 query heads after the export's fold): what halving the heads costs in
    # loss, against the llama.cpp decode speed it buys at 8k (docs/benchmarks.md, issue 17). Not in ORDER:
    # `python bench/study.py train --models hybrid-soft-h8` trains it
    "hybrid-soft-h8": ["model.preset=mamba-moe-300m", _NO_YARN, _H8],
    # the same two at twice the tokens, trained side by side in the same slices (same machine, same time):
    # `python bench/study.py train --models hybrid-soft-960 hybrid-soft-h8-960 --parallel --time-limit 540`
    "hybrid-soft-960": ["model.preset=mamba-moe-300m", _NO_YARN, _H16, _LONG],
    "hybrid-soft-h8-960": ["model.preset=mamba-moe-300m", _NO_YARN, _H8, _LONG],
}
ORDER = ["hybrid-soft", "transformer", "hybrid-dense", "hybrid-topk"]  # the most telling comparison first
FLAGSHIP = "hybrid-soft"
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 32.0,
        "beta_slow": 1.0}
SAVE_MARGIN_S = 60.0  # a slice stops this long before its end: the checkpoint write and the process exit


def tag(args: argparse.Namespace) -> str:
    """The suffix of the long-context and QAT results and runs: none for the flagship, ``.NAME`` when
    ``--model`` starts them from another of the study's models (their files then sit beside the flagship's)."""
    return "" if args.model == FLAGSHIP else f".{args.model}"


def arms(args: argparse.Namespace) -> dict[str, list[str]]:
    """QAT's two runs from ``--model``'s checkpoint: the QAT config, and the same with ``qat=null``."""
    return {f"qat-on{tag(args)}": [], f"qat-off{tag(args)}": ["qat=null"]}


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], deadline: float | None = None) -> int:
    log("$ " + shlex.join(cmd))
    timeout = None if deadline is None else max(deadline - time.monotonic(), 1.0)
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log(f"stopped at the slice's end: {cmd[0]}")
        return 124


def mamba_moe(*args: str) -> list[str]:
    return [sys.executable, "-m", "mamba_moe", *args]


def _max_steps(config: str, extra: list[str]) -> int:
    """max_steps of a run: the config's, or the last ``max_steps=`` of the --extra overrides."""
    import yaml

    steps = int(yaml.safe_load((ROOT / config).read_text())["max_steps"])
    for item in extra:
        if item.startswith("max_steps="):
            steps = int(item.split("=", 1)[1])
    return steps


def finished_step(out: Path) -> int:
    """The step of the newest complete checkpoint of a run folder (0 when there is none)."""
    from mamba_moe.checkpoint_dirs import resolve_model_dir

    try:
        return int(resolve_model_dir(ROOT / out).name.removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


# ---- phases -----------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace) -> None:
    if not (ROOT / TOKENIZER / "tokenizer.json").exists():
        if run(mamba_moe("data", "train-tokenizer", "--output", TOKENIZER, "--vocab-size", "32000")):
            raise SystemExit("study: tokenizer training failed")
    if not (ROOT / SHARDS / "manifest.json").exists():
        if run(mamba_moe("data", "prepare", "--config", DATA_CONFIG)):
            raise SystemExit("study: data prepare failed")
    log(f"data ready: {SHARDS}")


def total_steps(name: str, args: argparse.Namespace) -> int:
    """max_steps of a model's run: the config's, its own override, or --extra's (the last one wins)."""
    return _max_steps(TRAIN_CONFIG, [*MODELS[name], *args.extra])


def train(args: argparse.Namespace, deadline: float) -> bool:
    """Train each model to its max_steps, within the slice; True when all are done. With ``--parallel``
    the models that are not done all start at once (one GPU shared), each logging to runs/study/NAME.log."""
    together: list[tuple[str, list[str]]] = []
    for name in args.models:
        out = RUNS / name
        step = finished_step(out)
        if step >= total_steps(name, args):
            log(f"{name}: done ({step} steps)")
            continue
        left = deadline - time.monotonic() - SAVE_MARGIN_S
        if left < args.min_slice:
            log(f"{name}: {left:.0f}s left in this slice, less than --min-slice {args.min_slice:.0f}s; next slice")
            return False
        cmd = mamba_moe("train", "--config", TRAIN_CONFIG, f"output={out}", *MODELS[name], *args.extra,
                        "--time-limit", f"{left:.0f}")
        if step:
            cmd.append("--resume")
        if args.parallel:
            together.append((name, cmd))
            continue
        if code := run(cmd):
            raise SystemExit(f"study: training {name} failed (exit {code})")
        if finished_step(out) < total_steps(name, args):
            return False
    codes = run_together({name: cmd for name, cmd in together})
    if failed := {name: code for name, code in codes.items() if code}:
        raise SystemExit(f"study: training failed: {failed} (logs: {RUNS}/NAME.log)")
    return all(finished_step(RUNS / name) >= total_steps(name, args) for name in codes)


def run_together(cmds: dict[str, list[str]]) -> dict[str, int]:
    """Run the commands at once, each writing to runs/study/NAME.log; their exit codes by name."""
    procs = {}
    for name, cmd in cmds.items():
        log(f"$ {shlex.join(cmd)}  > {RUNS / name}.log")
        (ROOT / RUNS).mkdir(parents=True, exist_ok=True)
        with open(ROOT / RUNS / f"{name}.log", "a", encoding="utf-8") as sink:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    return {name: proc.wait() for name, proc in procs.items()}


def _load(path: Path, rope_scaling: object = "keep", device: str = "cuda"):
    import torch
    from safetensors.torch import load_file

    from mamba_moe.config import MambaMoEConfig
    from mamba_moe.model import MambaMoEForCausalLM
    from mamba_moe.model.lm import load_state_dict_checked

    config = MambaMoEConfig.load(path / "config.json")
    if rope_scaling != "keep":
        config = config.replace(rope_scaling=rope_scaling)
    model = MambaMoEForCausalLM(config)
    load_state_dict_checked(model, load_file(str(path / "model.safetensors")), str(path))
    return model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()


def longctx(args: argparse.Namespace) -> None:
    """Loss by position over held-out windows of the longest length, plain RoPE vs YaRN x4."""
    import torch

    from mamba_moe.checkpoint_dirs import resolve_model_dir
    from mamba_moe.evaluation.heldout import bucket_means, loss_by_position

    target = RUNS / f"longctx{tag(args)}.json"
    if target.exists() and not args.force and all(v in json.loads(target.read_text())["variants"]
                                                   for v in LONGCTX_VARIANTS):
        log(f"longctx: done ({target})")
        return
    ckpt = resolve_model_dir(ROOT / RUNS / args.model)
    length = max(args.lengths)
    edges = sorted({0, *(n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= length), length})
    result = {"checkpoint": str(ckpt), "windows": args.windows, "length": length, "edges": edges,
              "trained_seq_len": 8192, "variants": {}}
    trained = result["trained_seq_len"]
    # "rope-8k": the same tokens scored in pieces of the training length (every token sees <= 8k before it),
    # the position-by-position reference for what the longer context adds
    for variant, scaling, context in (("rope-8k", None, trained), ("rope", None, None), ("yarn4", YARN, None)):
        model = _load(ckpt, scaling, args.device)
        torch.cuda.synchronize() if args.device == "cuda" else None
        t0 = time.perf_counter()
        curve = loss_by_position(model, ROOT / SHARDS, length, args.windows, device=args.device,
                                 context=context if context and length % context == 0 else None)
        result["variants"][variant] = {
            "rope_scaling": scaling, "context": context or length, "seconds": round(time.perf_counter() - t0, 1),
            "buckets": [{"start": a, "end": b, "loss": v} for a, b, v in bucket_means(curve, edges)],
            "mean_to": {str(n): float(curve[:n].mean()) for n in args.lengths},
            # a coarse curve for the plot: means over 256-position blocks
            "curve_256": [float(curve[i:i + 256].mean()) for i in range(0, length, 256)],
        }
        means = result["variants"][variant]["mean_to"]
        log(f"longctx {variant}: " + "  ".join(f"{k}: {v:.3f}" for k, v in means.items()))
        del model
    _write_json(target, result)


def qat(args: argparse.Namespace, deadline: float) -> None:
    """QAT vs its control at equal tokens from the flagship's checkpoint, then held-out losses of each as
    float, fake 4-bit (Q4_0 blocks of 32) and, with llama-cpp-python installed, GGUF Q4_0 / Q4_K_M."""
    from mamba_moe.checkpoint_dirs import resolve_model_dir

    base = RUNS / args.model
    total = _max_steps(QAT_CONFIG, args.extra)
    for arm, extra in arms(args).items():
        out = RUNS / arm
        if finished_step(out) >= total:
            continue
        left = deadline - time.monotonic() - SAVE_MARGIN_S
        if left < args.min_slice:
            log(f"qat {arm}: {left:.0f}s left in this slice, less than --min-slice; next slice")
            return
        cmd = mamba_moe("train", "--config", QAT_CONFIG, "--checkpoint", str(base), f"output={out}", *extra,
                        *args.extra, "--time-limit", f"{max(left, 1):.0f}")
        if finished_step(out):
            cmd.append("--resume")
        if run(cmd):
            raise SystemExit(f"study: {arm} failed")
        if finished_step(out) < total:
            log("qat: the slice ended; continue in the next")
            return
    target = RUNS / f"qat{tag(args)}.json"
    fresh = {"base": args.model, "windows": args.windows, "seq": args.qat_seq, "rows": {}}
    result = json.loads(target.read_text()) if target.exists() else fresh
    rows = result["rows"]
    for arm in arms(args):
        ckpt = resolve_model_dir(ROOT / RUNS / arm)
        for form in ("float", "fake-q4_0"):
            key = f"{arm}/{form}"
            if key not in rows:
                rows[key] = _torch_heldout(ckpt, form, args)
                log(f"qat {key}: {rows[key]['loss']:.4f}")
                _write_json(target, result)
    if args.gguf:  # in a child process: a llama.cpp build that dies (an unsupported CPU) ends only that
        code = run([sys.executable, __file__, "qat-gguf", "--model", args.model, "--gguf-seq", str(args.gguf_seq),
                    "--gguf-windows", str(args.gguf_windows)])
        if code:
            log(f"qat: GGUF scoring failed (exit {code}); the PyTorch rows stand")


def qat_gguf(args: argparse.Namespace) -> None:
    from mamba_moe.checkpoint_dirs import resolve_model_dir

    target = RUNS / f"qat{tag(args)}.json"
    result = json.loads(target.read_text())
    for arm in arms(args):
        ckpt = resolve_model_dir(ROOT / RUNS / arm)
        for kind in ("f32", "q4_0", "q4_k_m"):  # f32: llama.cpp's float, the reference of the Q4 rows
            key = f"{arm}/gguf-{kind}"
            if key not in result["rows"]:
                result["rows"][key] = _gguf_heldout(ckpt, kind, args)
                log(f"qat {key}: {result['rows'][key]['loss']:.4f}")
                _write_json(target, result)


def _torch_heldout(ckpt: Path, form: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from mamba_moe.evaluation.heldout import heldout_loss
    from mamba_moe.training.qat import convert_qat, prepare_qat

    model = _load(ckpt, device=args.device).float()
    if form == "fake-q4_0":  # the same rounding the QAT arm trained through, now fixed into the weights
        prepare_qat(model, bits=4, group_size=32)
        convert_qat(model)
    dtype = torch.bfloat16 if args.device == "cuda" else None
    r = heldout_loss(model, ROOT / SHARDS, args.qat_seq, args.windows, batch_size=4, device=args.device,
                     autocast=dtype)
    return {"loss": r.loss, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}


def _gguf_heldout(ckpt: Path, kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Held-out loss in llama.cpp (CPU) of the checkpoint exported at ``kind`` by llama.cpp's own quantizer."""
    import numpy as np
    import torch.nn.functional as F

    from mamba_moe.evaluation.backends.gguf import GGUFBackend
    from mamba_moe.evaluation.heldout import bytes_per_token, windows
    from mamba_moe.export.gguf_export import export_gguf

    path = ROOT / RUNS / f"{ckpt.parent.parent.name}-{kind}.gguf"
    if not path.exists():
        export_gguf(ckpt, path, type=kind)
    backend = GGUFBackend(path, n_ctx=args.gguf_seq + 1, threads=os.cpu_count())
    total, n = 0.0, 0
    try:
        for window in windows(ROOT / SHARDS, args.gguf_seq, args.gguf_windows):
            ids = window.tolist()
            logits = backend.logits(ids[:-1]).float()
            total += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            n += len(ids) - 1
    finally:
        backend.close()
    loss = total / n
    return {"loss": loss, "bits_per_byte": loss / math.log(2) / bytes_per_token(ROOT / SHARDS), "tokens": n,
            "file_mb": round(path.stat().st_size / 2**20, 1), "seq": args.gguf_seq,
            "windows": args.gguf_windows, "numpy": np.__version__}


def collect(args: argparse.Namespace) -> None:
    """Copy what the plots and tables need (small files) from runs/study into docs/results/study."""
    dest = ROOT / RESULTS
    dest.mkdir(parents=True, exist_ok=True)
    for name in [*MODELS, *arms(args)]:
        src = ROOT / RUNS / name / "metrics.jsonl"
        if src.exists():
            shutil.copyfile(src, dest / f"{name}.metrics.jsonl")
    for name in (f"longctx{tag(args)}.json", f"qat{tag(args)}.json"):
        if (ROOT / RUNS / name).exists():
            shutil.copyfile(ROOT / RUNS / name, dest / name)
    manifest = ROOT / SHARDS / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        _write_json(dest / "data.json", {"totals": m["totals"], "tokenizer": m["tokenizer"]["path"],
                                         "bytes_per_token_val": _val_bytes_per_token(),
                                         "sources": [{k: s[k] for k in ("name", "kind")} for s in m["sources"]]})
    log(f"collected into {RESULTS}: {sorted(p.name for p in dest.iterdir())}")


def _val_bytes_per_token() -> float:
    from mamba_moe.evaluation.heldout import bytes_per_token

    return bytes_per_token(ROOT / SHARDS)


def _write_json(path: Path, data: object) -> None:
    from mamba_moe.atomic import atomic_write

    atomic_write(ROOT / path, json.dumps(data, indent=1) + "\n")


def plot(args: argparse.Namespace) -> None:
    from study_report import write_report

    write_report(ROOT / RESULTS, ROOT / "docs/results")


# ---- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["all", "prepare", "train", "longctx", "qat", "qat-gguf", "collect", "plot"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=ORDER)
    p.add_argument("--model", default=FLAGSHIP, choices=list(MODELS),
                   help="the run longctx and qat start from (results of another than the flagship: *.NAME.json)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds this call may take (a slice)")
    p.add_argument("--min-slice", type=float, default=150.0,
                   help="do not start a training slice shorter than this (compilation alone takes ~1 min)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--windows", type=int, default=8, help="held-out windows per long-context / QAT measurement")
    p.add_argument("--qat-seq", type=int, default=8192)
    p.add_argument("--gguf", action=argparse.BooleanOptionalAction, default=None,
                   help="also score GGUF Q4 exports in llama.cpp (default: when llama_cpp imports)")
    p.add_argument("--gguf-seq", type=int, default=2048)
    p.add_argument("--gguf-windows", type=int, default=8)
    p.add_argument("--force", action="store_true", help="redo a finished long-context measurement")
    p.add_argument("--parallel", action="store_true",
                   help="train the --models side by side on the one GPU (a comparison made in the same slices)")
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value",
                   help="overrides added to every training command (a CPU smoke run: seq_len=64 max_steps=2 ...)")
    args = p.parse_args(argv)
    if args.gguf is None:
        try:
            import llama_cpp  # noqa: F401
            args.gguf = True
        except ImportError:
            args.gguf = False
    os.chdir(ROOT)
    deadline = time.monotonic() + (args.time_limit if args.time_limit else 1e9)
    if args.phase == "all":
        run_all(args, deadline)
    elif args.phase == "prepare":
        prepare(args)
    elif args.phase == "train":
        train(args, deadline)
    elif args.phase == "longctx":
        longctx(args)
    elif args.phase == "qat":
        qat(args, deadline)
    elif args.phase == "qat-gguf":
        qat_gguf(args)
    elif args.phase == "collect":
        collect(args)
    elif args.phase == "plot":
        plot(args)
    return 0


def run_all(args: argparse.Namespace, deadline: float) -> None:
    """What is not in docs/results/study yet, in the order that keeps partial progress useful: the models
    without committed curves, then (when their results are incomplete) the flagship's long-context and QAT
    measurements, which need its checkpoint on this machine and so may retrain it. Then collect."""
    prepare(args)
    todo = [name for name in ORDER if name != args.model and not committed_curve(name, args)]
    done = train(argparse.Namespace(**{**vars(args), "models": todo}), deadline)
    if done and not (committed_complete(f"longctx{tag(args)}.json", LONGCTX_VARIANTS)
                     and committed_complete(f"qat{tag(args)}.json", qat_rows(args))):
        if train(argparse.Namespace(**{**vars(args), "models": [args.model]}), deadline):
            longctx(args)
            qat(args, deadline)
    elif done and not committed_curve(args.model, args):
        train(argparse.Namespace(**{**vars(args), "models": [args.model]}), deadline)
    collect(args)
    model = "" if args.model == FLAGSHIP else f" --model {args.model}"
    limit = f"{args.time_limit or 540:.0f}"
    log(f"next (continues where this stopped): python bench/study.py all{model} --time-limit {limit}")


LONGCTX_VARIANTS = ["rope-8k", "rope", "yarn4"]


def qat_rows(args: argparse.Namespace) -> list[str]:
    forms = ["float", "fake-q4_0"] + (["gguf-f32", "gguf-q4_0", "gguf-q4_k_m"] if args.gguf else [])
    return [f"{arm}/{form}" for arm in arms(args) for form in forms]


def committed_curve(name: str, args: argparse.Namespace) -> bool:
    """docs/results/study holds this model's metrics up to max_steps (from an earlier slice or session)."""
    from study_report import read_metrics

    path = ROOT / RESULTS / f"{name}.metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return bool(records) and records[-1]["step"] >= total_steps(name, args)


def committed_complete(name: str, keys: list[str]) -> bool:
    path = ROOT / RESULTS / name
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    have = data.get("variants", data.get("rows", {}))
    return all(k in have for k in keys)


if __name__ == "__main__":
    raise SystemExit(main())
