"""GPU benchmark of the chunked SSD scan, forward and forward + backward, side by side:

- ours:      ``mamba_moe.ops.kernels.ssd_chunked_triton`` (Triton, forward and backward kernels)
- mamba_ssm: ``mamba_chunk_scan_combined`` from state-spaces/mamba's Triton SSD, imported from its
             public source in ``--peer`` (default ``.peer/``; benchmark only, never committed). The
             column is skipped when that source is absent.
- pytorch:   ``mamba_moe.ops.ssd.ssd_chunked`` (the reference; fp32 math), optionally torch.compile'd.

    python bench/ssd_kernels.py                                  # flagship head shape, seq 2k/8k/32k
    python bench/ssd_kernels.py --seqs 8192 --repeats 50
    python bench/ssd_kernels.py --compile-seqs 2048              # + torch.compile(ssd_chunked) there
    python bench/ssd_kernels.py --profile-seq 8192               # + per-kernel CUDA times (profiler)
    python bench/ssd_kernels.py --sweep                          # + our launch-config variants
    python bench/ssd_kernels.py --out docs/ssd_bench.md          # also write the tables as markdown

Shapes: heads 32, head_dim 64, d_state 128, groups 1, chunk 256 (the flagship's Mamba2 layer); batch =
max(1, tokens // seq) with --tokens 16384, so seq 32k runs 32k tokens. x, B, C bf16; dt (post-softplus),
A, D fp32, as Mamba2Mixer passes them. Times are medians of --repeats runs timed with CUDA events after
--warmup runs; the inputs (>= 64 MB for x alone) do not fit in L2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _machine import cuda_time  # noqa: E402  (bench/_machine.py, beside this script)

from mamba_moe.ops.kernels import ssd_triton as T  # noqa: E402
from mamba_moe.ops.ssd import ssd_chunked  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_peer(path: str):
    if not os.path.isdir(os.path.join(path, "mamba_ssm")):
        print(f"# mamba_ssm source not found under {path!r}: its column is skipped")
        return None
    sys.path.insert(0, os.path.abspath(path))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - any import failure just drops the column
        print(f"# mamba_ssm import failed ({type(e).__name__}: {e}): its column is skipped")
        return None
    return mamba_chunk_scan_combined


def make_inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(b, l, h, p, **kw).to(dtype)
    dt = F.softplus(torch.randn(b, l, h, **kw) * 0.5 - 4.0)           # ~0.005 .. 0.1, like dt_min/max
    A = -torch.empty(h, device="cuda").uniform_(1, 16, generator=gen)
    B = torch.randn(b, l, g, n, **kw).to(dtype)
    C = torch.randn(b, l, g, n, **kw).to(dtype)
    D = torch.randn(h, **kw)
    return [x, dt, A, B, C, D]


def impls(chunk, peer, compiled):
    out = {"ours": lambda x, dt, A, B, C, D: T.ssd_chunked_triton(x, dt, A, B, C, chunk, D)[0]}
    if peer is not None:
        out["mamba_ssm"] = lambda x, dt, A, B, C, D: peer(x, dt, A, B, C, chunk, D=D)
    out["pytorch"] = lambda x, dt, A, B, C, D: ssd_chunked(x, dt, A, B, C, chunk, D)[0]
    if compiled is not None:
        out["pytorch+compile"] = lambda x, dt, A, B, C, D: compiled(x, dt, A, B, C, chunk, D)[0]
    return out


def gpu_time(fn, reps=5) -> float:
    """Sum of the device time of every kernel ``fn`` launches, per call (torch.profiler): the GPU's
    share of a step, free of the host's launch overhead (which the event timings include)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return total / reps / 1000.0


def measure(fn, inputs, dy, warmup, repeats, with_gpu=True):
    """(fwd ms, fwd+bwd ms, GPU fwd ms, GPU fwd+bwd ms, peak MB of fwd+bwd above the inputs)."""
    def fwd_step():
        with torch.no_grad():
            fn(*inputs)

    fwd = cuda_time(fwd_step, warmup, repeats)
    leaves = [a.detach().requires_grad_() for a in inputs]

    def step():
        y = fn(*leaves)
        torch.autograd.grad(y, leaves, dy.to(y.dtype))

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    both = cuda_time(step, warmup, repeats)
    gfwd = gpu_time(fwd_step) if with_gpu else float("nan")
    gboth = gpu_time(step) if with_gpu else float("nan")
    return fwd, both, gfwd, gboth, peak


def accuracy(fns, b, seq, args, dtype) -> list[str]:
    """Error of each implementation against ssd_chunked in float64 on the same (rounded) inputs."""
    inputs = make_inputs(b, seq, args.heads, args.head_dim, args.groups, args.d_state, dtype, seed=7)
    dy = torch.randn(b, seq, args.heads, args.head_dim, device="cuda").to(dtype)
    leaves = [a.detach().double().requires_grad_() for a in inputs]
    y = ssd_chunked(*leaves[:5], args.chunk, leaves[5])[0]
    ref = [y, *torch.autograd.grad(y, leaves, dy.double())]
    names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD"]
    out = [f"Error vs float64 reference (seq {seq}, batch {b}, {args.dtype} inputs; max|err| / max|ref|):", "",
           "| impl | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for name, fn in fns.items():
        if name.startswith("pytorch"):
            continue
        lv = [a.detach().requires_grad_() for a in inputs]
        y = fn(*lv)
        got = [y, *torch.autograd.grad(y, lv, dy.to(y.dtype))]
        errs = [float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(got, ref, strict=True)]
        out.append(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    return out


def agreement(fn_a, fn_b, inputs, dy) -> str:
    """max-normalised differences of y and of every gradient between two implementations."""
    res = []
    for fn in (fn_a, fn_b):
        leaves = [a.detach().requires_grad_() for a in inputs]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        res.append([y.float(), *[g.float() for g in grads]])
    names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD"]
    parts = []
    for name, a, b in zip(names, *res, strict=True):
        err = float((a - b).abs().max().detach() / b.abs().max().clamp(min=1e-30).detach())
        parts.append(f"{name} {err:.1e}")
    return ", ".join(parts)


def kernel_resources() -> list[str]:
    """Registers, spills and shared memory of our compiled kernels (Triton's own report)."""
    from mamba_moe.ops.kernels import _ssd_kernels as K

    rows = []
    for name in sorted(dir(K)):
        fn = getattr(K, name)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        for dev_cache in caches.values():
            for kern in dev_cache[0].values():
                try:
                    kern._init_handles()
                    rows.append(f"| {name} | {kern.metadata.num_warps} | {kern.metadata.num_stages} | "
                                f"{kern.n_regs} | {kern.n_spills} | {kern.metadata.shared} |")
                except Exception as e:  # noqa: BLE001
                    rows.append(f"| {name} | ? | ? | ? | ? | {type(e).__name__} |")
    return rows


def profile_kernels(fn, inputs, dy, label) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    leaves = [a.detach().requires_grad_() for a in inputs]

    def step():
        y = fn(*leaves)
        torch.autograd.grad(y, leaves, dy.to(y.dtype))

    step()
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = []
    def self_time(e):  # kernels carry their own time; CPU-side ops only their children's
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    total = 0.0
    for e in sorted(prof.key_averages(), key=lambda e: -self_time(e)):
        t = self_time(e) / reps / 1000.0
        if t <= 0:
            continue
        total += t
        rows.append((e.key[:70], t, e.count // reps))
    out = [f"| {label} kernel | ms per step | launches per step |", "| --- | ---: | ---: |"]
    out += [f"| `{k}` | {t:.3f} | {c} |" for k, t, c in rows[:16]]
    out.append(f"| **sum of kernels** | **{total:.3f}** | |")
    return out


SWEEP = [
    ("default", {}),
    ("cb warps 8", {"cb": {"num_warps": 8}}),
    ("chunk_state warps 8", {"chunk_state": {"num_warps": 8}}),
    ("chunk_state BLOCK_T 32", {"chunk_state": {"BLOCK_T": 32}}),
    ("state_pass BLOCK 128", {"state_pass": {"BLOCK": 128}}),
    ("state_pass BLOCK 512", {"state_pass": {"BLOCK": 512}}),
    ("fwd warps 8", {"fwd": {"num_warps": 8}}),
    ("fwd stages 3", {"fwd": {"num_stages": 3}}),
    ("fwd BLOCK_M 128 warps 8", {"fwd": {"BLOCK_M": 128, "num_warps": 8}}),
    ("bwd_dcb warps 8", {"bwd_dcb": {"num_warps": 8}}),
    ("bwd_dcb stages 3", {"bwd_dcb": {"num_stages": 3}}),
    ("bwd_dc warps 8", {"bwd_dc": {"num_warps": 8}}),
    ("bwd_db warps 8", {"bwd_db": {"num_warps": 8}}),
    ("bwd_dc+db stages 3", {"bwd_dc": {"num_stages": 3}, "bwd_db": {"num_stages": 3}}),
    ("bwd_dx warps 8", {"bwd_dx": {"num_warps": 8}}),
    ("bwd_dx stages 3", {"bwd_dx": {"num_stages": 3}}),
    ("all blocks 32", {"fwd": {"BLOCK_M": 32}, "bwd_dc": {"BLOCK_M": 32}, "bwd_db": {"BLOCK_K": 32},
                       "bwd_dx": {"BLOCK_K": 32}}),
    ("split_target 4/SM", {"split_target": 528}),
    ("split_target 16/SM", {"split_target": 2112}),
]


def run_sweep(chunk, inputs, dy, warmup, repeats) -> list[str]:
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in T.CONFIG.items()}
    fn = impls(chunk, None, None)["ours"]
    out = ["| variant | fwd ms GPU | fwd+bwd ms GPU | fwd+bwd ms wall |", "| --- | ---: | ---: | ---: |"]
    for name, change in SWEEP:
        T.CONFIG.clear()
        T.CONFIG.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()})
        for k, v in change.items():
            if isinstance(v, dict):
                T.CONFIG[k].update(v)
            else:
                T.CONFIG[k] = v
        try:
            _, both, gfwd, gboth, _ = measure(fn, inputs, dy, warmup, repeats)
            out.append(f"| {name} | {gfwd:.3f} | {gboth:.3f} | {both:.3f} |")
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            out.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
        print(out[-1], flush=True)
    T.CONFIG.clear()
    T.CONFIG.update(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ref-repeats", type=int, default=5, help="repeats for the (slow) PyTorch reference")
    ap.add_argument("--peer", default=".peer", help="folder holding mamba_ssm's source (benchmark only)")
    ap.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch reference columns")
    ap.add_argument("--compile-seqs", type=int, nargs="*", default=[], help="seqs at which to time torch.compile")
    ap.add_argument("--profile-seq", type=int, default=0, help="seq at which to print per-kernel times")
    ap.add_argument("--accuracy-seq", type=int, default=2048, help="seq of the float64 accuracy check (0: skip)")
    ap.add_argument("--accuracy-tokens", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="time our launch-config variants at the middle seq")
    ap.add_argument("--sweep-repeats", type=int, default=10)
    ap.add_argument("--out", default="", help="also write the markdown tables to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")

    dtype = DTYPES[args.dtype]
    peer = load_peer(args.peer)
    import triton

    lines = [
        f"## SSD scan kernels — {datetime.date.today().isoformat()}",
        "",
        f"- device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs),"
        f" torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- shape: heads {args.heads}, head_dim {args.head_dim}, d_state {args.d_state}, groups {args.groups}, "
        f"chunk {args.chunk}, {args.dtype}; batch = max(1, {args.tokens} // seq); medians of {args.repeats} "
        f"(PyTorch reference: {args.ref_repeats}) CUDA-event timings after {args.warmup} warm-ups",
        f"- mamba_ssm: {'source in ' + args.peer if peer else 'absent'}",
        "",
        "Wall = CUDA events around back-to-back calls (includes host launch overhead where the GPU waits on it);",
        "GPU = sum of kernel times from torch.profiler (what the step costs the GPU when launches run ahead).",
        "",
        "| seq | batch | impl | fwd ms wall | fwd+bwd ms wall | fwd ms GPU | fwd+bwd ms GPU | Mtok/s (GPU, fwd+bwd) "
        "| peak MB (fwd+bwd) | GPU fwd+bwd vs mamba_ssm |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    agree = []
    t_start = time.time()
    for seq in args.seqs:
        b = max(1, args.tokens // seq)
        inputs = make_inputs(b, seq, args.heads, args.head_dim, args.groups, args.d_state, dtype, seed=seq)
        dy = torch.randn(b, seq, args.heads, args.head_dim, device="cuda").to(dtype)
        compiled = torch.compile(ssd_chunked) if seq in args.compile_seqs else None
        results = {}
        for name, fn in impls(args.chunk, peer, compiled).items():
            if name.startswith("pytorch") and args.no_pytorch:
                continue
            reps = args.ref_repeats if name.startswith("pytorch") else args.repeats
            t0 = time.time()
            try:
                fwd, both, gfwd, gboth, peak = measure(fn, inputs, dy, 1 if name.startswith("pytorch") else args.warmup,
                                                       reps)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = f"| {seq} | {b} | {name} | OOM | OOM | | | | | |"
                lines.append(row)
                print(row, flush=True)
                continue
            results[name] = gboth
            ratio = f"{gboth / results['mamba_ssm']:.2f}x" if "mamba_ssm" in results else ""
            row = (f"| {seq} | {b} | {name} | {fwd:.3f} | {both:.3f} | {gfwd:.3f} | {gboth:.3f} | "
                   f"{b * seq / gboth / 1e3:.1f} | {peak:.0f} | {ratio} |")
            lines.append(row)
            print(row + f"   ({time.time() - t0:.0f} s incl. compile)", flush=True)
            torch.cuda.empty_cache()
        if peer is not None:
            fns = impls(args.chunk, peer, None)
            agree.append(f"- seq {seq}: ours vs mamba_ssm (bf16 both, max-normalised): "
                         + agreement(fns["ours"], fns["mamba_ssm"], inputs, dy))
            print(agree[-1], flush=True)
        del inputs, dy
        torch.cuda.empty_cache()
    lines += ["", *agree]
    print(f"# main table done in {time.time() - t_start:.0f} s", flush=True)
    if args.accuracy_seq:
        rows = accuracy(impls(args.chunk, peer, None), max(1, args.accuracy_tokens // args.accuracy_seq),
                        args.accuracy_seq, args, dtype)
        lines += ["", *rows]
        print("\n".join(rows), flush=True)

    res_rows = kernel_resources()
    if res_rows:
        lines += ["", "Our compiled kernels (Triton's report):", "",
                  "| kernel | warps | stages | registers | spills | shared bytes |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |",
                  *res_rows]
        print("\n".join(lines[-len(res_rows) - 4:]), flush=True)

    if args.profile_seq:
        seq = args.profile_seq
        b = max(1, args.tokens // seq)
        inputs = make_inputs(b, seq, args.heads, args.head_dim, args.groups, args.d_state, dtype, seed=1)
        dy = torch.randn(b, seq, args.heads, args.head_dim, device="cuda").to(dtype)
        fns = impls(args.chunk, peer, None)
        for name in ("ours", "mamba_ssm"):
            if name in fns:
                rows = profile_kernels(fns[name], inputs, dy, f"{name} (seq {seq}, batch {b}, fwd+bwd)")
                lines += ["", *rows]
                print("\n".join(rows), flush=True)

    if args.sweep:
        seq = args.seqs[len(args.seqs) // 2]
        b = max(1, args.tokens // seq)
        inputs = make_inputs(b, seq, args.heads, args.head_dim, args.groups, args.d_state, dtype, seed=2)
        dy = torch.randn(b, seq, args.heads, args.head_dim, device="cuda").to(dtype)
        print(f"# sweep at seq {seq}, batch {b}", flush=True)
        lines += ["", f"Launch-config sweep of ours (seq {seq}, batch {b}):", "",
                  *run_sweep(args.chunk, inputs, dy, args.warmup, args.sweep_repeats)]

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
