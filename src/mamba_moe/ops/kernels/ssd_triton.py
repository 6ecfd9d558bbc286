"""Triton fast path of the chunked SSD scan (forward and backward), with a PyTorch reference beside it.

``ssd_chunked_triton`` computes what ``mamba_moe.ops.ssd.ssd_chunked`` computes (same arguments, same
shapes) and is differentiable in x, dt, A, B, C, D and initial_state. It also takes ``seq_idx``
(batch, seq) int: documents packed in one row, numbered in non-decreasing order along the sequence;
positions of different documents never see each other and the state restarts at each document's first
position (``initial_state`` belongs to the row's first document; the final state is the last
document's). ``ssd_chunked_varlen_ref`` is the reference of that mode.

Importing this module needs no Triton: the kernels load on first use. Where ``triton_available()``
is False, or the tensors are on the CPU without ``TRITON_INTERPRET=1``, use ``ssd_chunked``.

Precision: x, B, C in bfloat16, float16 or float32 (B and C are cast to x's dtype); dt, A, D,
initial_state in any float dtype. Accumulation, the cumulative decay and the state are float32. y
comes back in x's dtype (the reference returns float32), the final state in float32. Matrix
products take bf16/fp16 operands when x is bf16/fp16, and exact float32 (not tf32) when x is float32.

Design notes and measurements: docs/kernels.md.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..ssd import check_ssd_shapes, ssd_chunked

__all__ = [
    "CONFIG",
    "SSDChunkScanTritonFn",
    "seq_idx_from_cu_seqlens",
    "ssd_chunked_triton",
    "ssd_chunked_varlen_ref",
    "triton_available",
    "triton_supports",
]

# Launch parameters; the benchmark may sweep them. Block sizes are clipped to the chunk size.
# MIN_BLOCK_P 64 in every kernel that tiles head_dim: with head_dim 32, Triton 3.6 turns products with a
# 32-wide head_dim operand into 64x32 wgmmas that read shared memory out of bounds on some bf16 launches
# (compute-sanitizer, chunk-scan forward) or silently return wrong gradients (_bwd_dx_kernel at mamba-moe-small's
# shape: dx and ddt off by 1.7-3.6x their size, then an illegal memory access); padded to 64 columns (masked)
# they are right (docs/kernels.md). head_dim >= 64, the flagship's, is unaffected.
CONFIG: dict = {
    "chunk_state": {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3, "MIN_BLOCK_P": 64},
    "state_pass": {"BLOCK": 256, "num_warps": 4},
    "cb": {"num_warps": 4, "num_stages": 2},
    "fwd": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "MIN_BLOCK_P": 64},
    "bwd_dcb": {"num_warps": 4, "num_stages": 2, "MIN_BLOCK_P": 64},
    "bwd_dc": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "MIN_BLOCK_P": 64},
    "bwd_db": {"BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "MIN_BLOCK_P": 64},
    "bwd_dx": {"BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "MIN_BLOCK_P": 64},
    # The heads of a group are split among enough programs that a grid has about this many
    # programs (None: 8 per multiprocessor).
    "split_target": None,
}

# Tests set this to fill every output buffer with NaN before the kernels run (unwritten = caught).
POISON_OUTPUTS = False

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the kernels then run on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(x: Tensor, B: Tensor | None = None, chunk_size: int | None = None) -> bool:
    """Whether ``ssd_chunked_triton`` can take these inputs here (device, dtype, sizes)."""
    if not triton_available():
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    if x.dtype not in _SUPPORTED_DTYPES or x.shape[-1] > 128:
        return False
    if B is not None and B.shape[-1] > 256:
        return False
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return False
    return True


def _kernels():
    if _interpreting():
        _fix_interpreter_scalar_index()
    from . import _ssd_kernels

    return _ssd_kernels


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with ``int(array of shape (1,))``, which
    NumPy >= 2.4 refuses, so ``range(runtime_scalar)`` fails in interpreted kernels. Read the one
    element instead (only under TRITON_INTERPRET=1; compiled kernels are untouched)."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (v - 1).bit_length()))


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _block_p(P: int, kernel: str) -> int:
    """The head_dim tile of ``kernel``: P rounded up to a power of two, at least its ``MIN_BLOCK_P``."""
    return max(_pow2(P), CONFIG[kernel].get("MIN_BLOCK_P", 16))


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused for 16-bit operands


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pick_nsplit(heads_per_group: int, base_programs: int, device: torch.device) -> int:
    target = CONFIG["split_target"] or 8 * _num_sms(device)
    for d in range(1, heads_per_group + 1):
        if heads_per_group % d == 0 and base_programs * d >= target:
            return d
    return heads_per_group


def _seq_args(seq_idx: Tensor | None, x: Tensor) -> tuple[Tensor, int, int]:
    if seq_idx is None:
        return x, 0, 0  # a dummy pointer, never read
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _chunk_states(X: Tensor, Y: Tensor, dt: Tensor, s: Tensor, seq_idx: Tensor | None, mode: int,
                  Q: int, heads_per_group: int) -> Tensor:
    """(b, nchunks, h, p, n) fp32: Z_c (mode 0: X = x, Y = B) or dS_local_c (mode 1: X = dy, Y = C)."""
    k = _kernels()
    b, L, H, P = X.shape
    N = Y.shape[-1]
    nc = s.shape[2]
    out = _empty(b, nc, H, P, N, dtype=torch.float32, device=X.device)
    cfg = CONFIG["chunk_state"]
    BP, BN = _block_p(P, "chunk_state"), _pow2(N)
    if BP * BN > 128 * 128:
        BN = max(16, (128 * 128) // BP)
    npb, nnb = triton_cdiv(P, BP), triton_cdiv(N, BN)
    seq, sq_b, sq_l = _seq_args(seq_idx, X)
    grid = (H * npb * nnb, nc, b)
    k._chunk_state_kernel[grid](
        X, Y, dt, s, seq, out, L, H, P, N, nc, heads_per_group,
        *X.stride(), *Y.stride(), *dt.stride(), sq_b, sq_l,
        MODE=mode, HAS_SEQ=seq_idx is not None, Q=Q, BLOCK_T=min(cfg["BLOCK_T"], Q), BLOCK_P=BP, BLOCK_N=BN,
        DOT_PREC=_dot_prec(X.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _block(Q: int) -> int:
    """Tile of the CB / dCB matrices: the largest block any consumer uses (consumers read whole tiles)."""
    return min(Q, max(CONFIG["fwd"]["BLOCK_M"], CONFIG["bwd_dc"]["BLOCK_M"], CONFIG["bwd_db"]["BLOCK_K"],
                      CONFIG["bwd_dx"]["BLOCK_K"]))


def _n_causal_tiles(nb: int) -> int:
    """How many (i-block, j-block) tiles with j <= i a chunk of nb blocks has (kernels compute which is which)."""
    return nb * (nb + 1) // 2


def _cb(B: Tensor, C: Tensor, Q: int, nc: int) -> Tensor:
    """CB (b, nchunks, g, Q, Q) fp32, computed for the causal tiles only (the others are never read)."""
    k = _kernels()
    b, L, G, N = B.shape
    blk = _block(Q)
    ntiles = _n_causal_tiles(Q // blk)
    cb = _empty(b, nc, G, Q, Q, dtype=torch.float32, device=B.device)
    cfg = CONFIG["cb"]
    k._bmm_cb_kernel[(ntiles, nc, b * G)](
        B, C, cb, L, G, N, nc, *B.stride(), *C.stride(),
        Q=Q, BLK=blk, BLOCK_N=_pow2(N), DOT_PREC=_dot_prec(B.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return cb


def _forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             initial_state: Tensor | None, seq_idx: Tensor | None, Q: int) -> tuple[Tensor, ...]:
    k = _kernels()
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    hpg = H // G
    nc = triton_cdiv(L, Q)
    dev = x.device
    seq, sq_b, sq_l = _seq_args(seq_idx, x)

    s = _empty(b, H, nc, Q, dtype=torch.float32, device=dev)
    BH = 8
    k._dA_cumsum_kernel[(nc, triton_cdiv(H, BH), b)](
        dt, A, s, L, H, nc, *dt.stride(), Q=Q, BLOCK_Q=_pow2(Q), BLOCK_H=BH, num_warps=4)

    cb = _cb(B, C, Q, nc)
    states = _chunk_states(x, B, dt, s, seq_idx, 0, Q, hpg)
    final = _empty(b, H, P, N, dtype=torch.float32, device=dev)
    _state_pass_fwd(states, s, initial_state, final, seq_idx, L, Q)

    y = _empty(b, L, H, P, dtype=x.dtype, device=dev)
    cfg = CONFIG["fwd"]
    BM = min(cfg["BLOCK_M"], Q)
    k._chunk_scan_fwd_kernel[(H, nc * (Q // BM), b)](
        x, dt, s, C, cb, states, D if D is not None else x, seq, y,
        L, H, P, N, nc, hpg, G, *x.stride(), *dt.stride(), *C.stride(), *y.stride(), sq_b, sq_l,
        Q=Q, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, BLOCK_M=BM, BLOCK_P=_block_p(P, "fwd"),
        BLOCK_N=_pow2(N),
        DOT_PREC=_dot_prec(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, final, s, states, cb


def _state_pass_fwd(states: Tensor, s: Tensor, initial_state: Tensor | None, final: Tensor,
                    seq_idx: Tensor | None, L: int, Q: int) -> None:
    k = _kernels()
    b, nc, H, P, N = states.shape
    PN = P * N
    cfg = CONFIG["state_pass"]
    seq, sq_b, sq_l = _seq_args(seq_idx, states)
    init = initial_state.contiguous() if initial_state is not None else states
    k._state_fwd_kernel[(triton_cdiv(PN, cfg["BLOCK"]), b * H)](
        states, s, init, final, seq, L, H, nc, PN, sq_b, sq_l,
        Q=Q, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None, BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"])


def _backward(dy: Tensor, dfinal: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
              D: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None, s: Tensor,
              states: Tensor, cb: Tensor, Q: int) -> tuple[Tensor, ...]:
    """Gradients, given the forward's s, states entering each chunk (S_c) and CB; none of them is modified."""
    k = _kernels()
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    hpg = H // G
    nc = s.shape[2]
    dev = x.device
    HAS_SEQ = seq_idx is not None
    seq, sq_b, sq_l = _seq_args(seq_idx, x)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()

    # 1. The states entering each chunk come from the forward. They used to be recomputed here (a
    #    _chunk_state and a _state_fwd launch, 0.19 ms per flagship layer at 16k tokens on an H100, about
    #    3% of a training step); keeping them costs (b, chunks, h, p, n) fp32: 67 MB per layer at 16k tokens.

    # 2. Gradient of each chunk's outgoing state: local part, then the reverse recurrence (in place).
    dZ = _chunk_states(dy, C, dt, s, seq_idx, 1, Q, hpg)
    cfg = CONFIG["state_pass"]
    PN = P * N
    NBS = triton_cdiv(PN, cfg["BLOCK"])
    dinit = _empty(b, H, P, N, dtype=torch.float32, device=dev)
    dsend = _empty(b, H, nc, NBS, dtype=torch.float32, device=dev)
    dfin = dfinal.contiguous() if dfinal is not None else dZ
    k._state_bwd_kernel[(NBS, b * H)](
        dZ, states, dfin, s, seq, dinit, dsend, L, H, nc, PN, NBS, sq_b, sq_l,
        Q=Q, HAS_DFINAL=dfinal is not None, HAS_SEQ=HAS_SEQ, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])

    BN = _pow2(N)
    prec = _dot_prec(x.dtype)

    # 3. dCB (summed over the heads of a group) and the quadratic form's part of ds, per causal tile.
    blk = _block(Q)
    NB = Q // blk
    ntiles = _n_causal_tiles(NB)
    cfg = CONFIG["bwd_dcb"]
    BP = _block_p(P, "bwd_dcb")
    nsplit_cb = _pick_nsplit(hpg, ntiles * nc * b * G, dev)
    dcb = _empty(b, nc, nsplit_cb, G, Q, Q, dtype=torch.float32, device=dev)
    ds_row = _empty(b, H, nc, NB, Q, dtype=torch.float32, device=dev)
    ds_col = _empty(b, H, nc, NB, Q, dtype=torch.float32, device=dev)
    ds_tot = _empty(b, H, nc, NB, NB, dtype=torch.float32, device=dev)
    k._bwd_dcb_kernel[(ntiles, nc, b * G * nsplit_cb)](
        x, dt, s, dy, cb, seq, dcb, ds_row, ds_col, ds_tot,
        L, H, P, nc, hpg, hpg // nsplit_cb, nsplit_cb, G,
        *x.stride(), *dt.stride(), *dy.stride(), sq_b, sq_l,
        Q=Q, HAS_SEQ=HAS_SEQ, BLK=blk, BLOCK_P=BP, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # 4. dC = dCB @ B + state part (and ds_state); dB = dCB^T @ C + chunk-state part.
    cfg = CONFIG["bwd_dc"]
    BP = _block_p(P, "bwd_dc")
    BM = min(cfg["BLOCK_M"], Q)
    nsplit_c = _pick_nsplit(hpg, G * nc * (Q // BM) * b, dev)
    dC_part = _empty(b, L, nsplit_c, G, N, dtype=torch.float32, device=dev)
    ds_state = _empty(b, H, nc, Q, dtype=torch.float32, device=dev)
    k._bwd_dc_kernel[(G * nsplit_c, nc * (Q // BM), b)](
        s, B, C, dy, states, dcb, seq, dC_part, ds_state,
        L, H, P, N, nc, hpg, hpg // nsplit_c, nsplit_c, nsplit_cb, G,
        *B.stride(), *C.stride(), *dy.stride(), sq_b, sq_l,
        Q=Q, HAS_SEQ=HAS_SEQ, BLOCK_M=BM, BLOCK_P=BP, BLOCK_N=BN, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    cfg = CONFIG["bwd_db"]
    BP = _block_p(P, "bwd_db")
    BK = min(cfg["BLOCK_K"], Q)
    nsplit_b = _pick_nsplit(hpg, G * nc * (Q // BK) * b, dev)
    dB_part = _empty(b, L, nsplit_b, G, N, dtype=torch.float32, device=dev)
    k._bwd_db_kernel[(G * nsplit_b, nc * (Q // BK), b)](
        x, dt, s, C, dZ, dcb, seq, dB_part,
        L, H, P, N, nc, hpg, hpg // nsplit_b, nsplit_b, nsplit_cb, G,
        *x.stride(), *dt.stride(), *C.stride(), sq_b, sq_l,
        Q=Q, HAS_SEQ=HAS_SEQ, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # 5. Per head: dx, ddt's direct part, the chunk-state part of ds, dD.
    cfg = CONFIG["bwd_dx"]
    BP = _block_p(P, "bwd_dx")
    BK = min(cfg["BLOCK_K"], Q)
    NKB = Q // BK
    dx = _empty(b, L, H, P, dtype=x.dtype, device=dev)
    ddt_part = _empty(b, H, nc, Q, dtype=torch.float32, device=dev)
    ds_w = _empty(b, H, nc, Q, dtype=torch.float32, device=dev)
    dD_part = _empty(b, nc, NKB, H, dtype=torch.float32, device=dev) if D is not None else ds_w
    k._bwd_dx_kernel[(H, nc * NKB, b)](
        x, dt, s, B, dy, dZ, cb, D if D is not None else x, seq,
        dx, ddt_part, ds_w, dD_part,
        L, H, P, N, nc, hpg, G,
        *x.stride(), *dt.stride(), *B.stride(), *dy.stride(), *dx.stride(), sq_b, sq_l,
        Q=Q, HAS_D=D is not None, HAS_SEQ=HAS_SEQ, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # 6. ddt and dA from ds (reverse cumsum inside each chunk).
    ddt = _empty(b, L, H, dtype=torch.float32, device=dev)
    dA_part = _empty(b, nc, H, dtype=torch.float32, device=dev)
    BH = 4
    k._bwd_ddt_kernel[(nc, triton_cdiv(H, BH), b)](
        dt, A, ds_row, ds_col, ds_tot, ds_state, ds_w, ddt_part, dsend, ddt, dA_part, L, H, nc, NBS,
        *dt.stride(), *ddt.stride(), Q=Q, BLK=blk, BLOCK_H=BH, num_warps=4)

    dB = dB_part.sum(2) if nsplit_b > 1 else dB_part[:, :, 0]
    dC = dC_part.sum(2) if nsplit_c > 1 else dC_part[:, :, 0]
    dA = dA_part.sum((0, 1))
    dD = dD_part.sum((0, 1, 2)) if D is not None else torch.zeros(H, dtype=torch.float32, device=dev)
    return dx, ddt, dA, dB, dC, dD, dinit


# ----------------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees one opaque op each way instead of tracing the launches.

@torch.library.custom_op(
    "mamba_moe::ssd_chunked_fwd", mutates_args=(),
    schema="(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, "
           "Tensor? seq_idx, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _ssd_fwd_op(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
    return _forward(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)


@_ssd_fwd_op.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
    b, L, H, P = x.shape
    N = B.shape[-1]
    nc = -(-L // chunk_size)
    G = B.shape[2]
    f32 = torch.float32
    return (x.new_empty(b, L, H, P), x.new_empty(b, H, P, N, dtype=f32), x.new_empty(b, H, nc, chunk_size, dtype=f32),
            x.new_empty(b, nc, H, P, N, dtype=f32), x.new_empty(b, nc, G, chunk_size, chunk_size, dtype=f32))


@torch.library.custom_op(
    "mamba_moe::ssd_chunked_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor? dfinal, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
           "Tensor? initial_state, Tensor? seq_idx, Tensor s, Tensor states, Tensor cb, int chunk_size) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _ssd_bwd_op(dy, dfinal, x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb, chunk_size):
    return _backward(dy, dfinal, x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb, chunk_size)


@_ssd_bwd_op.register_fake
def _ssd_bwd_fake(dy, dfinal, x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb, chunk_size):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    f32 = torch.float32
    return (x.new_empty(b, L, H, P), x.new_empty(b, L, H, dtype=f32), x.new_empty(H, dtype=f32),
            x.new_empty(b, L, G, N, dtype=f32), x.new_empty(b, L, G, N, dtype=f32), x.new_empty(H, dtype=f32),
            x.new_empty(b, H, P, N, dtype=f32))


class SSDChunkScanTritonFn(torch.autograd.Function):
    """Autograd of the Triton SSD: forward and backward are Triton kernels (see _ssd_kernels.py)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
        y, final, s, states, cb = torch.ops.mamba_moe.ssd_chunked_fwd(x, dt, A, B, C, D, initial_state, seq_idx,
                                                                     chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dinit = torch.ops.mamba_moe.ssd_chunked_bwd(
            dy, dfinal, x, dt, A, B, C, D, initial_state, seq_idx, s, states, cb, ctx.chunk_size)
        return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.to(D.dtype),
                None if initial_state is None else dinit.to(initial_state.dtype), None, None)


def ssd_chunked_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                       D: Tensor | None = None, initial_state: Tensor | None = None,
                       seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked SSD through Triton: (y (b, l, h, p) in x's dtype, final state (b, h, p, n) fp32).

    Same contract as ``ssd_chunked`` (x (b,l,h,p), dt (b,l,h) post-softplus, A (h,) negative, B/C
    (b,l,g,n), D (h,), initial_state (b,h,p,n)); chunk_size a power of two >= 16, head_dim <= 128,
    d_state <= 256. ``seq_idx`` (b, l) integer: packed documents (see the module docstring).
    """
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    if not triton_available():
        raise RuntimeError("ssd_chunked_triton needs Triton; use mamba_moe.ops.ssd.ssd_chunked")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: must be a power of two >= 16 for the Triton path, got {chunk_size}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported by the Triton path (bf16, fp16, fp32)")
    if x.shape[-1] > 128 or B.shape[-1] > 256:
        raise ValueError(f"head_dim {x.shape[-1]} > 128 or d_state {B.shape[-1]} > 256: use ssd_chunked")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("ssd_chunked_triton: CPU tensors need TRITON_INTERPRET=1; use ssd_chunked on the CPU")
    if seq_idx is not None:
        if seq_idx.shape != x.shape[:2]:
            raise ValueError(f"seq_idx: expected {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.to(torch.int32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B = B.to(x.dtype) if B.dtype != x.dtype else B
    C = C.to(x.dtype) if C.dtype != x.dtype else C
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    A = A.float() if A.dtype != torch.float32 else A
    A = A.contiguous()
    if D is not None:
        D = D.contiguous()
    return SSDChunkScanTritonFn.apply(x, dt, A, B, C, D, initial_state, seq_idx, int(chunk_size))


# ----------------------------------------------------------------------------------------------------
# Reference of the packed-documents mode.

def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total_len: int | None = None) -> Tensor:
    """(1, total) int32 document index from cumulative lengths [0, l0, l0 + l1, ...]."""
    cu = cu_seqlens.to(torch.long)
    total = int(cu[-1]) if total_len is None else total_len
    lengths = torch.diff(cu)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    if ids.numel() < total:  # trailing positions past the last document: one more document
        ids = torch.cat([ids, ids.new_full((total - ids.numel(),), len(lengths))])
    return ids[None, :total].to(torch.int32)


def ssd_chunked_varlen_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                           D: Tensor | None = None, initial_state: Tensor | None = None,
                           seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference of ``seq_idx``: ``ssd_chunked`` run on each document (each run of equal ids) alone.

    The first document of a row starts from ``initial_state``, every later one from zero; the final
    state is that of the row's last document. Differentiable, float32/float64 like ``ssd_chunked``.
    """
    if seq_idx is None:
        return ssd_chunked(x, dt, A, B, C, chunk_size, D, initial_state)
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    b, L = x.shape[:2]
    ys, finals = [], []
    for r in range(b):
        ids = seq_idx[r]
        cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
        bounds = [0, *cuts, L]
        parts, state = [], None
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            init = initial_state[r:r + 1] if (i == 0 and initial_state is not None) else None
            y, state = ssd_chunked(x[r:r + 1, lo:hi], dt[r:r + 1, lo:hi], A, B[r:r + 1, lo:hi],
                                   C[r:r + 1, lo:hi], chunk_size, D, init)
            parts.append(y)
        ys.append(torch.cat(parts, dim=1))
        finals.append(state)
    return torch.cat(ys, dim=0), torch.cat(finals, dim=0)

