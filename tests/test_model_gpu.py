"""On CUDA the model (Triton SSD path included) computes what the CPU reference computes."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error

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
