"""Where one training step of the flagship goes: each part timed alone, fwd + bwd, at the step's shapes.

    python bench/step_anatomy.py                      # mamba-moe-300m, 2 x 8192, each part compiled
    python bench/step_anatomy.py --compile none       # eager parts
    python bench/step_anatomy.py --append docs/benchmarks.md

Each part runs under bf16 autocast with fp32 weights, exactly as in ``bench/train_throughput.py``:
a Mamba block and an attention block (norms, mixer, MoE FFN, residuals), their pieces alone (the mixer,
the MoE FFN, the in/out projections, the conv + SiLU, the SSD scan), the head with the chunked loss, the
embedding and the fused AdamW step. ``x count`` multiplies by how often the part occurs in one step;
summed over the top-level parts it should come close to the measured step (the difference is what the
parts do not see: launch gaps between blocks, the autograd engine, the loss's reductions).

The last column is the part's matmul floor: 3 x 2 x (weights it multiplies) x tokens at the bf16
matmul peak measured in the same run, i.e. the time if its GEMMs ran at peak and nothing else cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _machine import append_markdown, cuda_time  # noqa: E402

from mamba_moe import MambaMoEForCausalLM, get_preset  # noqa: E402
from mamba_moe.ops.cross_entropy import lm_cross_entropy  # noqa: E402
from mamba_moe.ops.kernels import ssd_chunked_triton  # noqa: E402
from mamba_moe.ops.kernels.conv_triton import causal_conv1d_triton  # noqa: E402


def linear_weights(module: torch.nn.Module) -> int:
    """Weights a token multiplies in matrix products: every matrix parameter (linear layers, the expert
    bank's stacked matrices) except the depthwise conv's taps."""
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and "conv1d" not in name)


def matmul_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ a, repeats=20)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def fwd_bwd(fn, *inputs):
    """A step function: fn(*inputs) under autocast, then backward of a fixed random cotangent."""
    grads = {}

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() == 0:
            out.backward()
        else:
            if "g" not in grads or grads["g"].shape != out.shape:
                grads["g"] = torch.randn_like(out)
            out.backward(grads["g"])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mamba-moe-300m")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--compile", choices=["parts", "none"], default="parts")
    ap.add_argument("--append", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch._dynamo.config.recompile_limit = 64
    config = get_preset(args.preset)
    torch.manual_seed(0)
    model = MambaMoEForCausalLM(config).cuda().train()
    b, l = max(1, args.tokens // args.seq), args.seq
    n = b * l
    peak = matmul_peak()
    compiled = args.compile == "parts"

    def maybe_compile(fn):
        return torch.compile(fn, dynamic=False) if compiled else fn

    layers = model.backbone.layers
    mamba_i = config.layer_mixers.index("mamba")
    attn_i = config.layer_mixers.index("attention") if "attention" in config.layer_mixers else None
    n_mamba = config.layer_mixers.count("mamba")
    n_attn = config.n_layers - n_mamba
    hidden = torch.randn(b, l, config.d_model, device="cuda", requires_grad=True)
    inputs = model.backbone._layer_inputs(hidden, None, None)
    mblock = layers[mamba_i]
    mixer = mblock.mixer

    parts = []  # (name, level, count, fn, weights)
    parts.append(("Mamba block (norm, mixer, norm, MoE FFN)", 0, n_mamba,
                  fwd_bwd(maybe_compile(lambda h: mblock(h, inputs)[0]), hidden), linear_weights(mblock)))
    if attn_i is not None:
        ablock = layers[attn_i]
        parts.append(("attention block", 0, n_attn, fwd_bwd(maybe_compile(lambda h: ablock(h, inputs)[0]), hidden),
                      linear_weights(ablock)))
        parts.append(("attention mixer alone (q/k/v/o, RoPE, SDPA)", 1, n_attn,
                      fwd_bwd(maybe_compile(lambda h: ablock.mixer(h, inputs.cos, inputs.sin, None)), hidden),
                      linear_weights(ablock.mixer)))
    parts.append(("Mamba mixer alone", 1, n_mamba, fwd_bwd(maybe_compile(lambda h: mixer(h)), hidden),
                  linear_weights(mixer)))
    if mblock.ffn_kind != "none":
        parts.append(("FFN alone (router, experts, shared expert)", 1, config.n_layers,
                      fwd_bwd(maybe_compile(lambda h: mblock.ffn(h)[0] if mblock.ffn_kind == "moe" else mblock.ffn(h)),
                              hidden), linear_weights(mblock.ffn)))
    parts.append(("  in_proj", 2, n_mamba, fwd_bwd(mixer.in_proj, hidden), mixer.in_proj.weight.numel()))
    y_in = torch.randn(b, l, mixer.d_inner, device="cuda", requires_grad=True)
    z_in = torch.randn(b, l, mixer.d_inner, device="cuda", requires_grad=True)
    parts.append(("  gated norm + out_proj", 2, n_mamba,
                  fwd_bwd(maybe_compile(lambda y, z: mixer.out_proj(mixer.norm(y, z))), y_in, z_in),
                  mixer.out_proj.weight.numel()))
    xbc = torch.randn(b, l, mixer.conv_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = mixer.conv1d.weight[:, 0, :]

    def conv_ref(x):
        from mamba_moe.ops.conv import causal_conv1d
        return torch.nn.functional.silu(causal_conv1d(x, weight, mixer.conv1d.bias)[0])

    parts.append(("  conv + SiLU, reference (F.conv1d)", 2, n_mamba, fwd_bwd(maybe_compile(conv_ref), xbc), 0))
    parts.append(("  conv + SiLU, Triton", 2, n_mamba,
                  fwd_bwd(lambda x: causal_conv1d_triton(x, weight, mixer.conv1d.bias), xbc), 0))
    h, p, g, s = mixer.num_heads, mixer.head_dim, mixer.ngroups, mixer.d_state
    x = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dt = (torch.rand(b, l, h, device="cuda") * 0.1 + 1e-3).requires_grad_()
    A = (-torch.rand(h, device="cuda") - 0.5).requires_grad_()
    B = torch.randn(b, l, g, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    C = torch.randn(b, l, g, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    parts.append(("  SSD scan (Triton)", 2, n_mamba,
                  fwd_bwd(lambda *t: ssd_chunked_triton(*t, mixer.chunk_size, mixer.D), x, dt, A, B, C), 0))
    final = torch.randn(n, config.d_model, device="cuda", requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (n,), device="cuda")
    parts.append(("final norm + head + chunked loss", 0, 1,
                  fwd_bwd(lambda f: lm_cross_entropy(model.backbone.final_norm(f), model.head, targets), final),
                  config.d_model * (config.embedding_rank or config.d_model)
                  + config.vocab_size * (config.embedding_rank or config.d_model)))
    ids = torch.randint(0, config.vocab_size, (b, l), device="cuda")
    parts.append(("embedding", 0, 1, fwd_bwd(lambda i: model.embed(i), ids), 0))
    for prm in model.parameters():
        prm.grad = torch.randn_like(prm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    parts.append(("AdamW step (fused)", 0, 1, opt.step, 0))

    lines = [f"## Step anatomy: `{args.preset}`, {b} x {l}, compile {args.compile} — "
             f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 matmul peak {peak:.0f} "
             "TFLOP/s (8192^3, same run)",
             f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
             "- each part: fwd + bwd under bf16 autocast, median of 10 after 3 warm-ups (CUDA events)", "",
             "| part | x count | ms once | ms per step | matmul floor ms per step |",
             "| :--- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    total = 0.0
    for name, level, count, fn, weights in parts:
        try:
            ms = cuda_time(fn)
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
            line = f"| {name} | {count} | {type(e).__name__}: {str(e)[:120]} | | |"
        else:
            floor = 6 * weights * n / (peak * 1e12) * 1e3 * count
            total += ms * count if level == 0 else 0.0
            line = f"| {name} | {count} | {ms:.3f} | {ms * count:.2f} | {floor:.2f} |"
        lines.append(line)
        print(line, flush=True)
    lines.append(f"| **sum of the top-level parts** | | | **{total:.1f}** | |")
    print(lines[-1], flush=True)
    append_markdown(args.append, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
