"""GPU training throughput, side by side: our hybrid, the same with dense FFNs, a Llama-style transformer,
and our hybrid running mamba_ssm's Triton SSD instead of ours.

    python bench/train_throughput.py                                   # the table at seq 2k, 8k, 32k
    python bench/train_throughput.py --models mamba-moe-300m --seqs 8192 --profile mamba-moe-300m:8192
    python bench/train_throughput.py --long 65536 131072 262144        # + longest context, checkpointing
    python bench/train_throughput.py --components                      # + loss / conv / MoE micro-benchmarks
    python bench/train_throughput.py --explain                         # + graph breaks of the whole model
    python bench/train_throughput.py --out results.md --append docs/benchmarks.md

Models (``--models``):
- ``mamba-moe-300m``: the flagship preset (20 Mamba2 + 4 diff2 attention layers, soft MoE everywhere).
- ``mamba-moe-300m-dense``: the same with a dense SwiGLU FFN of hidden 2048 = 6 x 256 + 512, the soft
  MoE's active FFN width, so the same parameters per token (less the router).
- ``transformer-baseline``: the Llama-style preset (24 x 1024, 16-head RoPE attention, SwiGLU 2816).
- ``mamba-moe-300m+mamba_ssm``: the flagship with mamba_ssm's ``mamba_chunk_scan_combined`` as the SSD,
  imported from its public source in ``--peer`` (default ``.peer/``; benchmark only, never committed).
  The call runs outside torch.compile (a graph break around each scan).

One training step = forward and backward of ``loss + aux_loss`` (chunked LM loss, no full logits) under
bf16 autocast with fp32 weights, then a fused AdamW step. Batch = max(1, --tokens // seq). Each block is
torch.compile'd (``--compile blocks``; ``blocks-cg`` also replays each block's forward and backward as CUDA
graphs, torch.compile's reduce-overhead mode; ``model`` compiles the whole model, ``none`` runs eager). After
--warmup steps (compilation included) --steps steps are timed one by one with CUDA events; tokens/s is
from the median step.

Model FLOPs per token (training = 3 x forward), documented in docs/benchmarks.md:
- 2 x every weight a token multiplies, once: linear layers, the active experts (all of them with the soft
  router), the router, the depthwise conv taps, the output head (the tied factorized head counts its
  table and its projection; a lookup-only embedding counts nothing);
- attention: 2 l (d_qk + d_v) per query head, halved for causality;
- the SSD scan in its chunked form with chunk Q: Q (n g + h p) (the causal half of the within-chunk
  products) + 4 h p n (chunk state and its read-out) per token.
MFU = model FLOP/s / the bf16 matmul peak measured in the same run (8192^3, median of 20).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _machine import cuda_time  # noqa: E402  (bench/_machine.py, beside this script)

from mamba_moe import MambaMoEForCausalLM, get_preset  # noqa: E402
from mamba_moe.config import MambaMoEConfig  # noqa: E402
from mamba_moe.model import mamba2 as mamba2_module  # noqa: E402
from mamba_moe.model.ffn import ExpertBank  # noqa: E402
from mamba_moe.ops import cross_entropy as ce_module  # noqa: E402

PEER_TAG = "+mamba_ssm"


def model_config(name: str) -> MambaMoEConfig:
    return get_preset(name.removesuffix(PEER_TAG))


# ---- model FLOPs ------------------------------------------------------------------------------------

def flops_per_token(model: MambaMoEForCausalLM, seq: int) -> dict[str, float]:
    """Forward FLOPs per token by part (see the module docstring); training is 3x the sum."""
    config = model.config
    share = config.effective_top_k / config.moe_num_experts
    macs = 0.0
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            if isinstance(module, ExpertBank):
                macs += p.numel() * share
            elif module_name == "embed" and pname == "weight":
                macs += p.numel() if config.tie_word_embeddings else 0   # the head's table, or a lookup only
            elif module_name == "embed.proj":
                macs += 2 * p.numel()                                     # the embedding and the tied head
            else:
                macs += p.numel()
    attn = ssd = 0.0
    for kind in config.layer_mixers:
        if kind == "attention":
            d = config.head_dim
            h = config.attn_num_heads
            if config.attn_type == "gqa":
                per_head = [(h, d, d)]
            elif config.attn_type == "diff2":
                per_head = [(2 * h, d, d)]
            else:  # diff: two maps over h heads, values 2d wide
                per_head = [(h, d, 2 * d), (h, d, 2 * d)]
            attn += sum(2 * seq * heads * (dqk + dv) / 2 for heads, dqk, dv in per_head)
        else:
            n, g, hh, p, Q = (config.ssm_state_size, config.ssm_ngroups, config.ssm_num_heads, config.ssm_head_dim,
                              min(config.ssm_chunk_size, seq))
            ssd += Q * (n * g + hh * p) + 4 * hh * p * n
    return {"matmul": 2 * macs, "attention": attn, "ssd": ssd}


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


# ---- the peer's SSD ---------------------------------------------------------------------------------

def load_peer(path: str):
    if not os.path.isdir(os.path.join(path, "mamba_ssm")):
        print(f"# mamba_ssm source not found under {path!r}: its rows are skipped")
        return None
    sys.path.insert(0, os.path.abspath(path))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - any import failure just drops the rows
        print(f"# mamba_ssm import failed ({type(e).__name__}: {e}): its rows are skipped")
        return None

    @torch.compiler.disable
    def peer_ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
        y, final = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                                             seq_idx=seq_idx, return_final_states=True)
        return y, final

    return peer_ssd


@contextlib.contextmanager
def ssd_impl(peer):
    """Swap the SSD the Mamba2 mixer calls on CUDA (the module global) for the peer's, inside the block."""
    original = mamba2_module.ssd_chunked_triton
    if peer is not None:
        mamba2_module.ssd_chunked_triton = peer
    try:
        yield
    finally:
        mamba2_module.ssd_chunked_triton = original


# ---- one configuration -----------------------------------------------------------------------------

def build(name: str, compile_mode: str, checkpointing: bool = False) -> MambaMoEForCausalLM:
    torch.manual_seed(0)
    model = MambaMoEForCausalLM(model_config(name)).cuda().train()
    model.set_gradient_checkpointing(checkpointing)
    if compile_mode in ("blocks", "blocks-cg"):
        # blocks-cg: each block's forward and backward also replayed as CUDA graphs (no launch gaps)
        mode = "reduce-overhead" if compile_mode == "blocks-cg" else None
        for layer in model.backbone.layers:
            layer.compile(dynamic=False, mode=mode)
    elif compile_mode == "model":
        model.compile(dynamic=False)
    return model


def step_fn(model, opt, ids):
    def step():
        torch.compiler.cudagraph_mark_step_begin()  # for blocks-cg: a new iteration of the CUDA-graph trees
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, targets=ids, return_logits=False)
            loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def time_steps(step, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median step ms, compile/warm-up seconds, the last step's loss)."""
    t0 = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        loss = step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), warm_s, float(loss)


def run_config(name, seq, batch, args, peer, peak, checkpointing=False, compile_mode=None, steps=None,
               profile_into: list[str] | None = None, warmup: int | None = None):
    compile_mode = compile_mode or args.compile
    row = {"model": name, "seq": seq, "batch": batch, "ckpt": checkpointing, "compile": compile_mode}
    model = opt = None
    try:
        with ssd_impl(peer if name.endswith(PEER_TAG) else None):
            model = build(name, compile_mode, checkpointing)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
            step = step_fn(model, opt, ids)
            torch.cuda.reset_peak_memory_stats()
            ms, warm_s, loss = time_steps(step, args.warmup if warmup is None else warmup, steps or args.steps)
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
            if profile_into is not None:
                part = profile_step(step, f"{name}, {compile_mode}", seq, batch)
                print("\n".join(part), flush=True)  # now: a later time-out must not lose it
                profile_into += part
        flops = flops_per_token(model, seq)
        per_token = 3 * sum(flops.values())
        tok_s = batch * seq / (ms / 1000)
        row.update(ms=ms, tok_s=tok_s, tflops=tok_s * per_token / 1e12, mfu=tok_s * per_token / 1e12 / peak,
                   peak_gb=peak_gb, warm_s=warm_s, loss=loss,
                   params=model.num_parameters(), active=model.num_parameters(active=True),
                   gflop_tok=per_token / 1e9, attn_share=flops["attention"] / sum(flops.values()))
    except torch.OutOfMemoryError:
        row.update(error="OOM")
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others' rows
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print(format_row(row), flush=True)
    return row


def format_row(r) -> str:
    head = (f"| `{r['model']}` | {r['seq']:,} | {r['batch']} | {'yes' if r['ckpt'] else 'no'} | {r['compile']} | ")
    if "error" in r:
        return head + f"{r['error']} | | | | | | |"
    return head + (f"**{r['tok_s']:,.0f}** | {r['ms']:.1f} | {r['tflops']:.0f} | {100 * r['mfu']:.1f}% | "
                   f"{r['peak_gb']:.1f} | {r['params'] / 1e6:.1f}M | {r['warm_s']:.0f} |")


TABLE_HEAD = ("| model | seq | batch | act. ckpt | compile | tokens/s | step ms | model TFLOP/s | MFU | peak GB | "
              "params | warm-up s |\n"
              "| :--- | ---: | ---: | :---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


# ---- extras: profile, components, graph breaks -----------------------------------------------------

def profile_step(step, name, seq, batch) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
              and "#" not in e.key]  # user annotations (Optimizer.step#...) would count their kernels twice
    total = sum(e.self_device_time_total for e in events) / 2
    rows = sorted(events, key=lambda e: -e.self_device_time_total)
    cats: dict[str, float] = {}
    for e in events:
        cats[category(e.key)] = cats.get(category(e.key), 0.0) + e.self_device_time_total / 2
    out = [f"\nProfile of one step, `{name}`, seq {seq} x batch {batch} (torch.profiler, kernel time per step; "
           f"sum {total / 1000:.1f} ms):", "", "| category | ms | share |", "| :--- | ---: | ---: |"]
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        out.append(f"| {k} | {v / 1000:.2f} | {100 * v / total:.1f}% |")
    out += ["", "| kernel (top 40) | calls/step | ms | share |", "| :--- | ---: | ---: | ---: |"]
    for e in rows[:40]:
        out.append(f"| `{e.key[:90]}` | {e.count // 2} | {e.self_device_time_total / 2000:.2f} | "
                   f"{100 * e.self_device_time_total / 2 / total:.1f}% |")
    return out


def category(kernel: str) -> str:
    k = kernel.lower()
    if k.startswith("_conv_"):  # _conv_fwd_kernel, _conv_dz_kernel, _conv_dx_dw_kernel
        return "conv1d + SiLU (Triton)"
    if k.startswith(("_ce_fwd_kernel", "_ce_bwd_kernel")):
        return "LM loss (Triton CE)"
    if any(s in k for s in ("_chunk_scan", "_chunk_state", "_state_fwd", "_state_bwd", "_bwd_d", "_bmm_cb",
                            "_da_cumsum", "_state_passing", "_bmm_chunk", "_chunk_cumsum")):
        return "SSD scan (Triton)"
    if "flash" in k or "fmha" in k or "attention" in k:
        return "attention (SDPA)"
    if "conv" in k and "triton" not in k:
        return "depthwise conv1d (cuDNN/ATen)"
    if any(s in k for s in ("gemm", "sm90", "xmma", "cutlass", "nvjet", "cublas", "matmul", "grouped")):
        return "matmul (cuBLAS/CUTLASS)"
    if "adam" in k or "multi_tensor" in k or "foreach" in k:
        return "optimizer"
    if k.startswith("triton"):
        return "fused elementwise/reductions (inductor)"
    return "other ATen kernels (copies, elementwise, reductions)"


def peak_of(fn) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def components(args) -> list[str]:
    """Loss, conv and MoE dispatch timed alone at the flagship's shapes (fwd + bwd, bf16 autocast)."""
    from mamba_moe.model.ffn import MoEFeedForward
    from mamba_moe.ops.conv import causal_conv1d
    from mamba_moe.ops.cross_entropy import lm_cross_entropy, lm_cross_entropy_reference
    from mamba_moe.ops.moe import route

    out = ["", "Components alone (fwd + bwd, bf16 autocast, median of 10 after 3 warm-ups):", "",
           "| component | shape | variant | ms | extra peak GB |", "| :--- | :--- | :--- | ---: | ---: |"]
    config = get_preset("mamba-moe-300m")
    model = MambaMoEForCausalLM(config).cuda()
    n = args.tokens
    hidden = torch.randn(n, config.d_model, device="cuda", requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (n,), device="cuda")

    def loss_fn(kind, chunk=8192, head=model.head):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if kind == "full":
                    loss = lm_cross_entropy_reference(hidden, head, targets)
                else:
                    loss = lm_cross_entropy(hidden, head, targets, chunk_size=chunk)
            loss.backward()
        return run

    variants = [("full logits (reference formula)", "full", 0, False),
                ("chunked 8192, plain formula", "chunk", 8192, False),
                ("chunked 8192, Triton CE", "chunk", 8192, True), ("chunked 16384, Triton CE", "chunk", 16384, True)]
    for label, kind, chunk, fast in variants:
        ce_module.TRITON_ON_CUDA = fast
        fn = loss_fn(kind, chunk)
        try:
            ms = cuda_time(fn)
            out.append(f"| LM loss + head | {n} x {config.d_model} -> {config.vocab_size} | {label} | {ms:.2f} | "
                       f"{peak_of(fn):.2f} |")
        except torch.OutOfMemoryError:
            out.append(f"| LM loss + head | {n} tokens | {label} | OOM | |")
    ce_module.TRITON_ON_CUDA = True
    hidden.grad = None

    # The conv (+ SiLU) of one Mamba2 layer: the reference (F.conv1d, as before) and the Triton kernel.
    from mamba_moe.ops.kernels.conv_triton import causal_conv1d_triton

    seq = 8192
    b = max(1, n // seq)
    mixer = model.backbone.layers[0].mixer
    xbc = torch.randn(b, seq, mixer.conv_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = mixer.conv1d.weight[:, 0, :].detach().requires_grad_()
    bias = mixer.conv1d.bias.detach().requires_grad_()

    def conv_reference(x, w, bb):
        return torch.nn.functional.silu(causal_conv1d(x, w, bb)[0])

    def conv_step(f):
        def run():
            y = f(xbc, weight, bias)
            y.backward(torch.ones_like(y))
        return run

    for label, f in (("reference: F.conv1d + SiLU", conv_reference),
                     ("Triton conv + SiLU", causal_conv1d_triton)):
        ms = cuda_time(conv_step(f))
        out.append(f"| causal depthwise conv1d + SiLU, one layer | {b} x {seq} x {mixer.conv_dim} | {label} | "
                   f"{ms:.3f} | |")

    # One MoE layer: the wide soft MLP against the einsum reference; top-k and Switch grouped vs the loop.
    for router in ("soft", "topk", "switch"):
        layer = MoEFeedForward(get_preset("mamba-moe-300m", moe_router=router, moe_top_k=2)).cuda()
        x = torch.randn(b, seq, config.d_model, device="cuda", requires_grad=True)
        experts = layer.experts
        fast = ("wide MLP (soft_moe)" if router == "soft" else "sorted + torch._grouped_mm")

        def run_layer(reference, layer=layer, x=x, router=router, experts=experts):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if reference:
                        tokens = x.view(-1, config.d_model)
                        r = route(layer.router(tokens).float(), router, layer.top_k)
                        if router == "soft":
                            y = torch.einsum("ned,ne->nd", experts.all_experts(tokens), r.weights.to(tokens.dtype))
                        else:
                            y = experts.mix_sparse(tokens, r.weights)
                        y = y + layer.shared_expert(tokens)
                    else:
                        y, _, _ = layer(x)
                y.float().sum().backward()
            return run

        for label, ref in ((fast, False), ("reference (einsum / loop)", True)):
            ms = cuda_time(run_layer(ref))
            out.append(f"| MoE FFN `{router}`, one layer | {b * seq} x {config.d_model} | {label} | {ms:.2f} | "
                       f"{peak_of(run_layer(ref)):.2f} |")
    del model
    torch.cuda.empty_cache()
    return out


def explain(names, seq=1024) -> list[str]:
    out = ["", f"Graph breaks of the whole model's training forward (torch._dynamo.explain, seq {seq}, bf16 autocast):",
           "", "| model | graphs | graph breaks | first reasons |", "| :--- | ---: | ---: | :--- |"]
    for name in names:
        model = MambaMoEForCausalLM(model_config(name)).cuda().train()
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")

        def fwd(ids, model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, targets=ids, return_logits=False)
                return out.loss + out.aux_loss

        e = torch._dynamo.explain(fwd)(ids)
        reasons = "; ".join(r.reason.splitlines()[0][:80] for r in e.break_reasons[:3]) or "-"
        out.append(f"| `{name}` | {e.graph_count} | {e.graph_break_count} | {reasons} |")
        torch._dynamo.reset()
        del model
    return out


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git on the device copy)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mamba-moe-300m", "mamba-moe-300m-dense", "transformer-baseline",
                                                    "mamba-moe-300m" + PEER_TAG])
    ap.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192, 32768])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step; batch = max(1, tokens // seq)")
    ap.add_argument("--compile", choices=["blocks", "blocks-cg", "model", "none"], default="blocks")
    ap.add_argument("--compiled-too", nargs="*", default=[], metavar="MODEL:SEQ",
                    help="also time these with --also-compile (e.g. when the grid runs eager)")
    ap.add_argument("--also-compile", choices=["blocks", "blocks-cg", "model"], default="blocks")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--long", nargs="*", type=int, default=[], help="batch-1 lengths with activation checkpointing "
                    "(mamba-moe-300m; stops at the first OOM)")
    ap.add_argument("--profile", nargs="*", default=[], metavar="MODEL:SEQ",
                    help="profile these runs (of --compiled-too when listed there, else of the grid)")
    ap.add_argument("--long-compile", choices=["blocks", "model", "none"], default="none")
    ap.add_argument("--components", action="store_true")
    ap.add_argument("--explain", nargs="*", default=None, metavar="MODEL")
    ap.add_argument("--peer", default=".peer")
    ap.add_argument("--git", default=None, help="git revision to record (the device copy has no .git)")
    ap.add_argument("--out", default=None, help="write the markdown section here")
    ap.add_argument("--append", default=None, help="append the markdown section to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch._dynamo.config.recompile_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = True

    import triton

    peer = load_peer(args.peer) if any(m.endswith(PEER_TAG) for m in args.models) else None
    props = torch.cuda.get_device_properties(0)
    peak = matmul_peak_tflops()
    lines = [f"## GPU training throughput — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"- device: {torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, "
             f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}",
             f"- git: {args.git or git_rev()}",
             f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
             f"- bf16 matmul peak measured in this run (8192^3, median of 20): **{peak:.0f} TFLOP/s** (the MFU "
             "denominator)",
             f"- step: fwd + bwd of loss + aux_loss (chunked LM loss), bf16 autocast, fp32 weights, fused AdamW; "
             f"{args.tokens} tokens per step (batch = max(1, tokens // seq)); median of {args.steps} timed steps "
             f"after {args.warmup} warm-up steps (compilation included in warm-up s)", ""]
    print("\n".join(lines), flush=True)
    print(TABLE_HEAD, flush=True)
    rows, profiles = [], []
    compiled_specs = [(n, int(q)) for n, q in (spec.split(":") for spec in args.compiled_too)]
    profile_specs = {(n, int(q)) for n, q in (spec.split(":") for spec in args.profile)}
    for seq in args.seqs:
        for name in args.models:
            if name.endswith(PEER_TAG) and peer is None:
                continue
            want = (name, seq) in profile_specs and (name, seq) not in compiled_specs
            rows.append(run_config(name, seq, max(1, args.tokens // seq), args, peer, peak,
                                   profile_into=profiles if want else None))
    for name, seq in compiled_specs:
        rows.append(run_config(name, seq, max(1, args.tokens // seq), args, peer, peak,
                               compile_mode=args.also_compile,
                               profile_into=profiles if (name, seq) in profile_specs else None))
    for seq in args.long:
        row = run_config("mamba-moe-300m", seq, 1, args, peer, peak, checkpointing=True, steps=1, warmup=1,
                         compile_mode=args.long_compile)
        rows.append(row)
        if "error" in row:
            break
    lines += [TABLE_HEAD] + [format_row(r) for r in rows]
    for mode in sorted({r["compile"] for r in rows}):
        flag = {r["seq"]: r for r in rows if r["model"] == "mamba-moe-300m" and "error" not in r and not r["ckpt"]
                and r["compile"] == mode}
        if 2048 in flag and 32768 in flag:
            ratio = flag[32768]["tok_s"] / flag[2048]["tok_s"]
            lines.append(f"\n`mamba-moe-300m` ({mode}): 32k / 2k throughput = {ratio:.2f} (target >= 0.85); 8k: "
                         f"{flag.get(8192, {}).get('tok_s', float('nan')):,.0f} tokens/s (target >= 150,000).")
    lines += profiles
    extras = []
    if args.components:
        extras.append(lambda: components(args))
    if args.explain is not None:
        extras.append(lambda: explain(args.explain or ["mamba-moe-300m", "mamba-moe-300m-dense",
                                                       "transformer-baseline"]))
    for extra in extras:
        try:
            part = extra()
        except Exception as e:  # noqa: BLE001 - keep the table when an extra fails
            part = [f"\n(extra failed: {type(e).__name__}: {str(e)[:300]})"]
        lines += part
        print("\n".join(part), flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
