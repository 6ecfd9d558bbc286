"""Experimental int8 CPU decoding: close to the float model, and usable by the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from mamba_moe import MambaMoEForCausalLM, get_preset
from mamba_moe.inference import Engine, SamplingParams
from mamba_moe.inference.decoders.quantize import quantize_int8
from mamba_moe.model.ffn import ExpertBank, PackedExperts

if "fbgemm" not in torch.backends.quantized.supported_engines:
    pytest.skip("int8 decoding needs the fbgemm engine (x86)", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("router", ["soft", "topk", "switch"])
def test_int8_model_stays_close_to_float_and_generates(router):
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", moe_router=router, moe_top_k=2)).eval()
    ids = torch.randint(0, 512, (2, 33))
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, ExpertBank) for m in quantized.modules())
    assert any(isinstance(m, PackedExperts) for m in quantized.modules())
    routers = {id(m.router) for m in quantized.modules() if hasattr(m, "router")}
    float_linears = [m for m in quantized.modules() if type(m) is torch.nn.Linear]
    assert float_linears and all(id(m) in routers for m in float_linears)   # routers alone stay in float
    with torch.inference_mode():
        ref, out = model(ids).logits, quantized(ids).logits
    # Int8 weights and 7-bit dynamic activations: a few percent of the logit range.
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.25
    engine = Engine(quantized)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [ids[0].tolist(), ids[1, :9].tolist()]
    together = engine.generate(prompts, params)
    assert [len(c.token_ids) for c in together] == [6, 6]


def test_only_float32_cpu_models_are_quantized():
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny")).double()
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(model)
