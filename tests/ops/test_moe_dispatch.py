"""MoE dispatch without a loop over experts equals the references (all_experts einsum, mix_sparse loop).

CPU: float64, 1e-12, forward and gradients. CUDA (marked gpu): fp32 against the float64 CPU reference
within 1e-4, bf16 within 3e-2, with the grouped GEMM (``torch._grouped_mm``) where it runs.
"""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.config import get_preset
from mamba_moe.model.ffn import MoEFeedForward
from mamba_moe.ops.moe import route
from mamba_moe.ops.moe_dispatch import dispatch_plan, grouped_mm_supported, sorted_moe

E, D, H, HS = 5, 48, 16, 40


def bank_and_shared(activation: str, shared: bool, dtype=torch.float64, device="cpu"):
    config = get_preset("mamba-moe-tiny", d_model=D, moe_num_experts=E, moe_expert_hidden_size=H,
                        moe_shared_expert_hidden_size=HS if shared else 0, ffn_activation=activation)
    layer = MoEFeedForward(config).to(device=device, dtype=dtype)
    for p in layer.parameters():  # O(1) weights, so errors are not hidden by tiny outputs
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


def soft_reference(layer: MoEFeedForward, x, weights):
    out = torch.einsum("ned,ne->nd", layer.experts.all_experts(x), weights.to(x.dtype))
    return out + layer.shared_expert(x) if layer.shared_expert is not None else out


def grad_error(a, b) -> float:
    """rel_error, floored at 1e-3 of scale: top-1 renormalised weights are exactly 1, their logit gradient is 0."""
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))


def grads(out, inputs, seed_grad):
    return torch.autograd.grad(out, inputs, seed_grad, retain_graph=True)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [True, False])
def test_soft_wide_mlp_equals_einsum_reference_fp64(activation, shared):
    layer = bank_and_shared(activation, shared)
    x = torch.randn(37, D, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(37, E, dtype=torch.float64, requires_grad=True)
    weights = torch.softmax(logits, -1)
    params = [x, logits, *layer.experts.parameters()] + (list(layer.shared_expert.parameters()) if shared else [])
    fast = layer.experts.mix_soft(x, weights, layer.shared_expert)
    ref = soft_reference(layer, x, weights)
    assert fast.shape == ref.shape == (37, D)
    assert rel_error(fast, ref) < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(grads(fast, params, g), grads(ref, params, g), strict=True):
        assert grad_error(a, b) < 1e-12


def test_soft_layer_state_dict_layout_unchanged():
    layer = bank_and_shared("swiglu", True)
    names = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert names == {"router.weight": (E, D), "experts.gate_proj": (E, H, D), "experts.up_proj": (E, H, D),
                     "experts.down_proj": (E, D, H), "shared_expert.gate_proj.weight": (HS, D),
                     "shared_expert.up_proj.weight": (HS, D), "shared_expert.down_proj.weight": (D, HS)}


def routed_case(router: str, k: int, n: int = 53, dtype=torch.float64, device="cpu", pad: bool = True):
    logits = (torch.randn(n, E, dtype=dtype, device=device) * 2).requires_grad_()
    valid = torch.rand(n, device=device) > 0.2 if pad else None
    routing = route(logits, router, k, valid, capacity_factor=0.8, min_capacity=2)
    return logits, routing


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(("router", "k"), [("topk", 1), ("topk", 2), ("topk", 3), ("switch", 1)])
def test_sorted_dispatch_equals_loop_reference_fp64(activation, router, k):
    layer = bank_and_shared(activation, False)
    x = torch.randn(53, D, dtype=torch.float64, requires_grad=True)
    logits, routing = routed_case(router, k)
    if router == "switch":
        assert routing.dropped.any()  # capacity 0.8: some tokens are dropped, so that case is covered
    params = [x, logits, *layer.experts.parameters()]
    ref = layer.experts.mix_sparse(x, routing.weights)
    fast = layer.experts.mix_grouped(x, routing.weights, k, impl="loop")
    assert rel_error(fast, ref) < 1e-12
    g = torch.randn_like(ref)
    fast_grads, ref_grads = grads(fast, params, g), grads(ref, params, g)
    if router == "topk" and k == 1:
        # The renormalised top-1 weight is exactly 1: the logit gradient is zero up to rounding (~1e-15),
        # so it is checked as zero on both paths rather than relative to its own noise.
        assert all(float(t[1].abs().max()) < 1e-12 for t in (fast_grads, ref_grads))
        fast_grads, ref_grads = fast_grads[:1] + fast_grads[2:], ref_grads[:1] + ref_grads[2:]
    for a, b in zip(fast_grads, ref_grads, strict=True):
        assert grad_error(a, b) < 1e-12


def test_dispatch_plan_sorts_by_expert_in_token_order():
    weights = torch.zeros(6, 3, dtype=torch.float64)
    choices = [(0, 2, 0.7), (0, 0, 0.3), (1, 1, 1.0), (2, 2, 0.6), (2, 1, 0.4), (4, 0, 0.5)]  # row 3/5: none
    for t, e, w in choices:
        weights[t, e] = w
    token, w_sorted, inverse, counts = dispatch_plan(weights, 2)
    chosen = weights.topk(2, -1).indices                                     # (6, 2): rows 3, 5 pick zeros
    experts = chosen.reshape(-1).sort(stable=True).values
    assert counts.tolist() == [int((chosen == e).sum()) for e in range(3)]
    for e in range(3):  # inside an expert's group, tokens keep their order
        rows = token[experts == e]
        assert (rows[1:] >= rows[:-1]).all()
    assert torch.equal(w_sorted, weights[token, experts])
    assert torch.equal(token[inverse], torch.arange(6).repeat_interleave(2))
    assert sorted(w_sorted[w_sorted > 0].tolist()) == sorted(w for *_, w in choices)


def test_dispatch_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        dispatch_plan(torch.rand(4, 3), 4)
    with pytest.raises(ValueError, match="impl"):
        sorted_moe(torch.randn(4, 8), torch.rand(4, 3), 1, None, torch.randn(3, 8, 8), torch.randn(3, 8, 8),
                   impl="bmm")


def test_grouped_mm_path_on_cpu_fp32_if_available():
    """torch._grouped_mm has a CPU fp32 fallback in recent torch; where it runs, it equals the loop."""
    layer = bank_and_shared("swiglu", False, dtype=torch.float32)
    x = torch.randn(53, D, requires_grad=True)
    logits, routing = routed_case("topk", 2, dtype=torch.float32)
    try:
        fast = layer.experts.mix_grouped(x, routing.weights, 2, impl="grouped_mm")
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {err}")
    ref = layer.experts.mix_sparse(x, routing.weights)
    assert rel_error(fast, ref) < 1e-5
    params = [x, logits, *layer.experts.parameters()]
    g = torch.randn_like(ref)
    for a, b in zip(grads(fast, params, g), grads(ref, params, g), strict=True):
        assert rel_error(a, b) < 1e-4


def test_grouped_mm_rule_is_cuda_bf16_only():
    w = torch.randn(3, 16, 8)
    assert not grouped_mm_supported(torch.randn(4, 8), w)                         # CPU
    assert not grouped_mm_supported(torch.randn(4, 8, dtype=torch.bfloat16), w.bfloat16())  # CPU bf16


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_moe_layer_output_equals_reference_fp64(router):
    config = get_preset("mamba-moe-tiny", d_model=D, moe_num_experts=E, moe_expert_hidden_size=H,
                        moe_shared_expert_hidden_size=HS, moe_router=router, moe_top_k=2, moe_capacity_factor=0.8)
    layer = MoEFeedForward(config).double()
    hidden = torch.randn(3, 11, D, dtype=torch.float64)
    mask = torch.rand(3, 11) > 0.2
    out, _, _ = layer(hidden, mask)
    tokens = hidden.transpose(0, 1).reshape(-1, D)
    logits = layer.router(tokens)
    routing = route(logits, router, layer.top_k, mask.transpose(0, 1).reshape(-1), 0.8, config.moe_min_capacity)
    if router == "soft":
        ref = soft_reference(layer, tokens, routing.weights)
    else:
        ref = layer.experts.mix_sparse(tokens, routing.weights) + layer.shared_expert(tokens)
    assert rel_error(out, ref.view(11, 3, D).transpose(0, 1)) < 1e-12


# ---- CUDA ----------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("router", "k"), [("soft", 6), ("topk", 2), ("switch", 1)])
def test_cuda_dispatch_matches_fp64_reference(router, k, dtype):
    n, d, h, hs, experts = 1000, 256, 128, 256, 6
    config = get_preset("mamba-moe-tiny", d_model=d, moe_num_experts=experts, moe_expert_hidden_size=h,
                        moe_shared_expert_hidden_size=hs)
    ref_layer = MoEFeedForward(config).double()
    for p in ref_layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    gpu_layer = MoEFeedForward(config).cuda().to(dtype)
    gpu_layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(n, d, dtype=torch.float64)
    logits = torch.randn(n, experts, dtype=torch.float64) * 2
    valid = torch.rand(n) > 0.1
    routing = route(logits, router, k, valid, capacity_factor=0.9, min_capacity=4)
    g = torch.randn(n, d, dtype=torch.float64)

    xr, wr = x.clone().requires_grad_(), routing.weights.clone().requires_grad_()
    if router == "soft":
        ref = soft_reference(ref_layer, xr, wr)
    else:
        ref = ref_layer.experts.mix_sparse(xr, wr) + ref_layer.shared_expert(xr)
    ref.backward(g)

    xg = x.to("cuda", dtype).requires_grad_()
    wg = routing.weights.to("cuda", torch.float32).requires_grad_()
    if router == "soft":
        out = gpu_layer.experts.mix_soft(xg, wg, gpu_layer.shared_expert)
    else:
        if dtype == torch.bfloat16:
            assert grouped_mm_supported(xg, gpu_layer.experts.up_proj), "bf16 on CUDA should take torch._grouped_mm"
        out = gpu_layer.experts.mix_grouped(xg, wg, k) + gpu_layer.shared_expert(xg)
    out.backward(g.to("cuda", dtype))
    tol = TOL[dtype]
    assert rel_error(out.double().cpu(), ref) < tol
    assert rel_error(xg.grad.double().cpu(), xr.grad) < tol
    used = routing.weights != 0  # a weight the router zeroed gets no gradient in the reference
    assert rel_error(wg.grad.double().cpu() * used, wr.grad * used) < tol
    for (name, p_ref), p_gpu in zip(ref_layer.named_parameters(), gpu_layer.parameters(), strict=True):
        if name.startswith("router"):
            continue
        assert rel_error(p_gpu.grad.double().cpu(), p_ref.grad) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_cuda_moe_layer_compiles_without_graph_breaks(router):
    config = get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2)
    layer = MoEFeedForward(config).cuda()
    hidden = torch.randn(2, 64, config.d_model, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(layer)(hidden)
    assert explanation.graph_break_count == 0, explanation.break_reasons



def test_soft_inference_with_few_tokens_takes_the_per_expert_path_and_agrees():
    from mamba_moe.model.ffn import SOFT_WIDE_MIN_TOKENS
    from mamba_moe.ops.moe_dispatch import soft_moe

    layer = bank_and_shared("swiglu", True)
    x = torch.randn(3, D, dtype=torch.float64)
    weights = torch.softmax(torch.randn(3, E, dtype=torch.float64), -1)
    bank, shared = layer.experts, layer.shared_expert
    assert x.shape[0] < SOFT_WIDE_MIN_TOKENS
    with torch.no_grad():
        few = bank.mix_soft(x, weights, shared)
        wide = soft_moe(x, weights, bank.gate_proj, bank.up_proj, bank.down_proj, shared.gate_proj.weight,
                        shared.up_proj.weight, shared.down_proj.weight)
    assert rel_error(few, wide) < 1e-12
