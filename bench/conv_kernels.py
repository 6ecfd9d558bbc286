"""The causal depthwise conv1d + SiLU of one Mamba2 layer on a GPU: Triton kernels against the reference.

    python bench/conv_kernels.py                 # flagship shape: 2 x 8192 x 2304, bf16, strided input
    python bench/conv_kernels.py --sweep         # + the backward's tile sizes

Timed with CUDA events (median of 20 after 3 warm-ups): the forward alone, and forward + backward. The
input is the mixer's slice of a wider in_proj output (row stride 4384), as in the model. The bytes column
is what one pass must move at least (read x, write y; backward: read x and dy, write dx) and GB/s is that
over the measured time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _machine import cuda_time  # noqa: E402

from mamba_moe.ops.conv import causal_conv1d  # noqa: E402
from mamba_moe.ops.kernels import conv_triton  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--channels", type=int, default=2304)
    ap.add_argument("--row", type=int, default=4384, help="row stride of the in_proj output holding x")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    b, l, c = args.batch, args.seq, args.channels
    wide = torch.randn(b, l, args.row, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :, 2048:2048 + c].detach().requires_grad_()
    weight = torch.randn(c, 4, device="cuda", requires_grad=True)
    bias = torch.randn(c, device="cuda", requires_grad=True)
    dy = torch.randn(b, l, c, device="cuda", dtype=torch.bfloat16)
    elem = b * l * c * 2

    def reference():
        return F.silu(causal_conv1d(x, weight.to(x.dtype), bias.to(x.dtype))[0])

    def triton_conv():
        return conv_triton.causal_conv1d_triton(x, weight, bias)

    def both(f):
        def run():
            torch.autograd.grad(f(), [x, weight, bias], dy)
        return run

    print("| variant | fwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s |\n| :--- | ---: | ---: | ---: | ---: |")
    compiled_reference = torch.compile(reference)
    for name, f in (("reference (F.conv1d + SiLU), eager", reference),
                    ("reference, torch.compile", compiled_reference),
                    ("Triton", triton_conv)):
        fwd = cuda_time(lambda f=f: f(), repeats=20)
        full = cuda_time(both(f), repeats=20)
        print(f"| {name} | {fwd:.3f} | {full:.3f} | {2 * elem / fwd / 1e6:.0f} | {3 * elem / (full - fwd) / 1e6:.0f} |",
              flush=True)
    if args.sweep:
        default = (conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_C, conv_triton.BWD_L_ITERS)
        for bl, bc, it in itertools.product((16, 32, 64), (32, 64, 128), (4, 8, 16)):
            if bl * bc > 64 * 64:
                continue
            conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_C, conv_triton.BWD_L_ITERS = bl, bc, it
            full = cuda_time(both(triton_conv), repeats=20)
            print(f"| Triton, backward pass 2 tiles {bl} x {bc}, {it} per program | | {full:.3f} | | |", flush=True)
        conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_C, conv_triton.BWD_L_ITERS = default


if __name__ == "__main__":
    main()
