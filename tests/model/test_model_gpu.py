"""On CUDA the model (Triton SSD path included) computes what the CPU reference computes."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe import MambaMoEForCausalLM, get_preset

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_cuda_forward_and_backward_match_cpu(router):
    config = get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2, ssm_chunk_size=32)
    cpu = MambaMoEForCausalLM(config)
    gpu = MambaMoEForCausalLM(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 100))
    out_cpu = cpu(ids, labels=ids)
    out_gpu = gpu(ids.cuda(), labels=ids.cuda())
    assert rel_error(out_gpu.logits.cpu(), out_cpu.logits) < 1e-3
    (out_cpu.loss + out_cpu.aux_loss).backward()
    (out_gpu.loss + out_gpu.aux_loss).backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert rel_error(p_gpu.grad.cpu(), p_cpu.grad) < 1e-2, name


def test_cuda_bf16_incremental_decode_matches_full_forward():
    config = get_preset("mamba-moe-tiny", ssm_chunk_size=32)
    model = MambaMoEForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (2, 70), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.new_cache(2)
        pieces = [model(ids[:, :50], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                             for t in range(50, 70)]
    assert torch.isfinite(full).all()
    assert rel_error(torch.cat(pieces, 1).float(), full) < 5e-2


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_cuda_chunked_loss_and_dispatch_match_cpu(router):
    """The GPU fast paths together (wide soft MLP / grouped top-k and Switch dispatch, compiled chunked loss)."""
    config = get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2, moe_capacity_factor=1.0, ssm_chunk_size=32)
    cpu = MambaMoEForCausalLM(config)
    gpu = MambaMoEForCausalLM(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, config.vocab_size, (3, 90))
    targets = torch.randint(0, config.vocab_size, (3, 90))
    targets[0, :7] = -100
    out_cpu = cpu(ids, targets=targets, return_logits=False)
    out_gpu = gpu(ids.cuda(), targets=targets.cuda(), return_logits=False)
    assert rel_error(out_gpu.loss.cpu(), out_cpu.loss) < 1e-4
    (out_cpu.loss + out_cpu.aux_loss).backward()
    (out_gpu.loss + out_gpu.aux_loss).backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert rel_error(p_gpu.grad.cpu(), p_cpu.grad) < 1e-2, name


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_cuda_whole_model_training_forward_has_no_graph_breaks(router):
    config = get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2, ssm_chunk_size=32)
    model = MambaMoEForCausalLM(config).cuda().train()
    ids = torch.randint(0, config.vocab_size, (2, 64), device="cuda")

    def loss(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, targets=ids, return_logits=False)
            return out.loss + out.aux_loss

    explanation = torch._dynamo.explain(loss)(ids)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    torch._dynamo.reset()


def test_cuda_compiled_model_training_step_matches_eager():
    config = get_preset("mamba-moe-tiny", ssm_chunk_size=32)
    eager = MambaMoEForCausalLM(config).cuda()
    compiled = MambaMoEForCausalLM(config).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(dynamic=False)
    ids = torch.randint(0, config.vocab_size, (2, 96), device="cuda")
    losses = []
    for model in (eager, compiled):
        out = model(ids, targets=ids, return_logits=False)
        (out.loss + out.aux_loss).backward()
        losses.append(out.loss.detach())
    assert torch.isfinite(losses[1]) and rel_error(losses[1], losses[0]) < 1e-4
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert rel_error(p_c.grad, p_e.grad) < 1e-3, name
    torch._dynamo.reset()


def test_cuda_gradient_checkpointing_matches_plain_backward():
    config = get_preset("mamba-moe-tiny", ssm_chunk_size=32)
    plain = MambaMoEForCausalLM(config).cuda()
    ckpt = MambaMoEForCausalLM(config).cuda()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    ids = torch.randint(0, config.vocab_size, (2, 80), device="cuda")
    for model in (plain, ckpt):
        out = model(ids, targets=ids, return_logits=False)
        (out.loss + out.aux_loss).backward()
    for (name, p_a), p_b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert rel_error(p_b.grad, p_a.grad) < 1e-5, name
