"""The Triton cross-entropy (sum over rows) equals F.cross_entropy, value and logits gradient.

Tiers: ``TRITON_INTERPRET=1`` with Triton (CPU, fp32, small vocabularies); ``gpu``-marked with CUDA (fp32 and
bf16 at a 32k vocabulary, through the chunked LM loss too). Tolerances (|error| / |float64 reference|): fp32
1e-5; bf16 logits: loss 1e-5 (the reference sees the same rounded logits), gradient 1e-2 (it is rounded to
bf16). NaN never passes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_error

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs Triton and TRITON_INTERPRET=1")


def check(n, v, dtype, device, grad_tol):
    from mamba_moe.ops.kernels.ce_triton import cross_entropy_sum_triton

    logits = (torch.randn(n, v, device=device) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < 0.2] = -100
    loss = cross_entropy_sum_triton(logits, targets, -100)
    g = torch.rand((), device=device) + 0.5
    (dlogits,) = torch.autograd.grad(loss, logits, g)
    ref_in = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, ignore_index=-100, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_in, g.double())
    assert loss.dtype == torch.float32 and dlogits.dtype == dtype
    assert rel_error(loss.double(), ref) < 1e-5
    assert rel_error(dlogits.double(), ref_grad) < grad_tol


@needs_interpreter
@pytest.mark.parametrize(("n", "v"), [(5, 37), (3, 4096), (4, 5000), (1, 1)])
def test_interpreted_cross_entropy_matches_reference(n, v):
    check(n, v, torch.float32, "cpu", 1e-5)


@needs_interpreter
def test_interpreted_out_of_range_target_is_an_error():
    from mamba_moe.ops.kernels.ce_triton import cross_entropy_sum_triton

    logits = torch.randn(4, 16)
    for bad in (16, -2):
        with pytest.raises(RuntimeError, match="targets"):
            cross_entropy_sum_triton(logits, torch.tensor([0, 3, bad, -100]))
    assert torch.isfinite(cross_entropy_sum_triton(logits, torch.tensor([0, 3, 15, -100])))


@needs_interpreter
def test_interpreted_chunked_lm_loss_uses_triton_and_matches_reference(monkeypatch):
    from mamba_moe.ops import cross_entropy as ce

    calls = []
    original = ce.cross_entropy_sum_triton
    monkeypatch.setattr(ce, "cross_entropy_sum_triton", lambda *a: calls.append(1) or original(*a))

    hidden = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=False)
    targets = torch.randint(0, 300, (50,))
    targets[:5] = -100
    got = ce.lm_cross_entropy(hidden, head, targets, chunk_size=16)
    ref = ce.lm_cross_entropy_reference(hidden, head, targets)
    assert len(calls) == 4  # ceil(50 / 16) chunks
    assert rel_error(got, ref) < 1e-5
    got_grad, ref_grad = (torch.autograd.grad(x, hidden)[0] for x in (got, ref))
    assert rel_error(got_grad, ref_grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cross_entropy_matches_reference(dtype):
    check(3000, 32000, dtype, "cuda", 1e-5 if dtype == torch.float32 else 1e-2)
    check(7, 50, dtype, "cuda", 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="compiled kernels only")
def test_cuda_chunked_lm_loss_with_triton_matches_reference_under_autocast():
    from mamba_moe.ops.cross_entropy import lm_cross_entropy, lm_cross_entropy_reference

    hidden = torch.randn(5000, 256, device="cuda", requires_grad=True)
    head = torch.nn.Linear(256, 32000, bias=False).cuda()
    targets = torch.randint(0, 32000, (5000,), device="cuda")
    targets[::7] = -100
    grads = []
    for fn in (lm_cross_entropy, lm_cross_entropy_reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, head, targets, chunk_size=2048) if fn is lm_cross_entropy else fn(hidden, head, targets)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [hidden, head.weight])))
    for got, ref in zip(grads[0], grads[1], strict=True):
        assert rel_error(got, ref) < 2e-2
