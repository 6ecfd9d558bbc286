"""The Triton causal depthwise conv1d (+ SiLU) equals ops.conv.causal_conv1d, forward and gradients.

Tiers, each skipping cleanly: ``TRITON_INTERPRET=1`` with Triton (CPU tensors, tiny shapes, fp32/fp16/bf16);
``gpu``-marked with CUDA (model shapes, fp32 and bf16, strided input, packed documents, torch.compile).
Tolerances (max |error| / max |float64 reference|): fp32 1e-5, fp16 2e-3, bf16 1e-2. NaN never passes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_error

from mamba_moe.ops.conv import causal_conv1d

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs Triton and TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x, weight, bias, seq_idx, activation):
    y, _ = causal_conv1d(x.double(), weight.double(), None if bias is None else bias.double(), seq_idx=seq_idx)
    return F.silu(y) if activation else y


def random_seq_idx(b, l, device):
    cuts = torch.rand(b, l, device=device) < 0.08
    cuts[:, 0] = False
    return torch.cumsum(cuts.int(), dim=1).to(torch.int32)


def check(b, l, c, K, dtype, device, bias=True, seq=False, activation=True, strided=False):
    from mamba_moe.ops.kernels.conv_triton import causal_conv1d_triton

    if strided:  # a column slice of a wider tensor, as the mixer passes its slice of in_proj's output
        x = torch.randn(b, l, c + 24, device=device).to(dtype)[:, :, 8:8 + c].requires_grad_()
    else:
        x = torch.randn(b, l, c, device=device).to(dtype).requires_grad_()
    weight = torch.randn(c, K, device=device, requires_grad=True)
    bias_t = torch.randn(c, device=device, requires_grad=True) if bias else None
    seq_idx = random_seq_idx(b, l, device) if seq else None
    y = causal_conv1d_triton(x, weight.to(dtype), None if bias_t is None else bias_t.to(dtype), seq_idx, activation)
    dy = torch.randn(b, l, c, device=device).to(dtype)
    grads = torch.autograd.grad(y, [x, weight] + ([bias_t] if bias else []), dy)

    xr = x.detach().double().requires_grad_()
    wr = weight.detach().to(dtype).double().requires_grad_()
    br = bias_t.detach().to(dtype).double().requires_grad_() if bias else None
    yr = reference(xr, wr, br, seq_idx, activation)
    ref_grads = torch.autograd.grad(yr, [xr, wr] + ([br] if bias else []), dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (b, l, c)
    assert rel_error(y.double(), yr) < tol
    for name, got, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads, strict=False):
        assert rel_error(got.double(), ref) < tol, name


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no dot: bf16 interprets fine
@pytest.mark.parametrize(("bias", "seq", "activation", "K"),
                         [(True, False, True, 4), (False, False, False, 4), (True, True, True, 4),
                          (True, False, True, 3), (False, True, False, 2)])
def test_interpreted_conv_matches_reference(dtype, bias, seq, activation, K):
    check(2, 150, 40, K, dtype, "cpu", bias=bias, seq=seq, activation=activation, strided=True)


@needs_interpreter
def test_interpreted_conv_one_token_and_short_rows():
    check(1, 1, 5, 4, torch.float32, "cpu")
    check(3, 3, 9, 4, torch.float32, "cpu", seq=True)


def test_conv_triton_refuses_what_it_does_not_support():
    from mamba_moe.ops.kernels.conv_triton import conv_triton_supports

    x = torch.randn(1, 8, 4)
    assert not conv_triton_supports(x, torch.randn(4, 5))   # kernel size 5
    if not INTERPRET:
        assert not conv_triton_supports(x, torch.randn(4, 4))  # CPU tensors need the interpreter


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [False, True])
def test_cuda_conv_matches_reference(dtype, seq):
    check(2, 3000, 2304, 4, dtype, "cuda", seq=seq, strided=True)
    check(1, 777, 130, 4, dtype, "cuda", bias=False, seq=seq, activation=False)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels only")
def test_cuda_conv_compiles_as_one_op():
    from mamba_moe.ops.kernels.conv_triton import causal_conv1d_triton

    x = torch.randn(2, 256, 96, device="cuda", requires_grad=True)
    w = torch.randn(96, 4, device="cuda", requires_grad=True)
    b = torch.randn(96, device="cuda", requires_grad=True)
    compiled = torch.compile(causal_conv1d_triton, fullgraph=True)
    y = compiled(x, w, b)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    causal_conv1d_triton(x, w, b).sum().backward()
    assert rel_error(y, causal_conv1d_triton(x, w, b)) < 1e-6
    for got, t in zip(grads, (x, w, b), strict=True):
        assert rel_error(got, t.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels only")
def test_cuda_mixer_with_triton_conv_matches_reference_conv(monkeypatch):
    from mamba_moe.config import get_preset
    from mamba_moe.model.mamba2 import Mamba2Mixer
    from mamba_moe.ops.kernels import conv_triton

    mixer = Mamba2Mixer(get_preset("mamba-moe-tiny", ssm_chunk_size=32)).cuda()
    hidden = torch.randn(2, 100, mixer.d_model, device="cuda", requires_grad=True)
    results = []
    for use in (False, True):
        monkeypatch.setattr(conv_triton, "USE_IN_MODEL", use)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer(hidden)
        grads = torch.autograd.grad(out.float().sum(), [hidden, mixer.conv1d.weight, mixer.conv1d.bias])
        results.append((out.float(), *grads))
    for got, ref in zip(results[1], results[0], strict=True):
        assert rel_error(got, ref) < 2e-2
