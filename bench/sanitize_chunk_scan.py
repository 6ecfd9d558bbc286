"""Short bf16 calls of the Triton SSD forward, for compute-sanitizer: the chunk-scan fault of docs/kernels.md.

    CUDA_LAUNCH_BLOCKING=1 compute-sanitizer --tool memcheck python bench/sanitize_chunk_scan.py bf16
    ... python bench/sanitize_chunk_scan.py bp16     # the old tile (BLOCK_P 32 for head_dim 32): faulted

Variants (one per process: a memcheck error poisons the CUDA context): ``bf16`` (the current kernel),
``bp16`` (MIN_BLOCK_P back to 16, the faulting configuration), ``fp32``, ``noD`` (no D, no initial state),
``long`` (l = 65 and 200), ``flagship`` (head_dim 64, d_state 128, chunk 256). Prints one line per call
and "clean" at the end; the sanitizer prints any invalid access.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mamba_moe.ops.kernels import ssd_chunked_triton, ssd_triton  # noqa: E402


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    if variant == "bp16":
        ssd_triton.CONFIG["fwd"]["MIN_BLOCK_P"] = 16
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    h, p, n, q = (32, 64, 128, 256) if variant == "flagship" else (16, 32, 64, 64)
    lengths = [65, 200] if variant == "long" else [8]
    torch.manual_seed(0)
    for length in lengths:
        for call in range(4):
            x = torch.randn(1, length, h, p, device="cuda", dtype=dtype)
            dt = torch.rand(1, length, h, device="cuda") * 0.1
            A = -torch.rand(h, device="cuda")
            B = torch.randn(1, length, 1, n, device="cuda", dtype=dtype)
            C = torch.randn(1, length, 1, n, device="cuda", dtype=dtype)
            D = None if variant == "noD" else torch.ones(h, device="cuda")
            init = None if variant == "noD" else torch.randn(1, h, p, n, device="cuda")
            print(f"{variant}: l={length} call {call}", flush=True)
            with torch.no_grad():
                ssd_chunked_triton(x, dt, A, B, C, q, D, init)
            torch.cuda.synchronize()
    print(f"{variant}: clean", flush=True)


if __name__ == "__main__":
    main()
