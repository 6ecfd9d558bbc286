"""Fake quantization (Q4_0 / Q8_0 grids, straight-through gradient) and quantization-aware training."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.numerics import rel_error

from mamba_moe.config import get_preset
from mamba_moe.model import MambaMoEForCausalLM
from mamba_moe.model.lm import load_state_dict_checked
from mamba_moe.ops.quant import fake_quantize, fake_quantize_reference, quantize_dequantize
from mamba_moe.training.qat import convert_qat, is_qat, plain_state_dict, prepare_qat

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- ops/quant.py ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group", [((6, 64), 32), ((3, 5, 96), 32), ((4, 32), 16)])
def test_fake_quantize_matches_reference(bits, shape, group) -> None:
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 0.1  # blocks of different scales
    w[0, :group] = 0.0                                              # an all-zero block: d = 0
    w.view(-1)[5] = w.abs().max() * 3                               # an outlier, positive
    w.view(-1)[group + 7] = -w.abs().max() * 2                      # and a negative one
    fast, ref = fake_quantize(w, bits, group), fake_quantize_reference(w, bits, group)
    assert fast.shape == w.shape and fast.dtype == w.dtype
    assert torch.equal(fast, ref), f"max diff {(fast - ref).abs().max()}"
    assert rel_error(fast, w) < (0.2 if bits == 4 else 0.01)  # close to the input, not a copy of it
    assert not torch.equal(fast, w)


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_matches_gguf_package(bits) -> None:
    """The ``gguf`` package's numpy port of ggml's quantizers, i.e. what a GGUF writer would store."""
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    qtype = GGMLQuantizationType.Q4_0 if bits == 4 else GGMLQuantizationType.Q8_0
    w = torch.randn(12, 256) * 0.05
    w[0, 3], w[1, :32] = 1.0, 0.0
    stored = quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)
    assert torch.equal(fake_quantize(w, bits, 32), torch.from_numpy(stored))


def test_fake_quantize_on_the_grid() -> None:
    w = torch.randn(16, 128)
    for bits, levels in ((4, 16), (8, 255)):
        q = fake_quantize(w, bits, 32).view(16, 4, 32)
        for row in q.reshape(-1, 32):
            assert row.unique().numel() <= levels
        # every value is an integer multiple of the block's fp16 scale, within the integer range
        if bits == 4:
            pick = w.view(16, 4, 32).abs().argmax(-1, keepdim=True)
            d = (w.view(16, 4, 32).gather(-1, pick) / -8).half().float()
            k = q / d
            assert torch.equal(k, k.round()) and k.min() >= -8 and k.max() <= 7
            assert torch.allclose(q.gather(-1, pick), -8 * d)  # the largest magnitude maps to -8 * d
        else:
            d = (w.view(16, 4, 32).abs().amax(-1, keepdim=True) / 127).half().float()
            k = q / d
            assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 127


def test_fake_quantize_straight_through_gradient() -> None:
    w = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 64)
    (fake_quantize(w, 4, 32) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_fake_quantize_dtypes_and_errors() -> None:
    w = torch.randn(4, 64, dtype=torch.float64)
    assert fake_quantize(w, 4).dtype == torch.float64
    assert torch.equal(fake_quantize(w.bfloat16(), 8), quantize_dequantize(w.bfloat16(), 8))
    with pytest.raises(ValueError, match=r"\(4, 60\).*group_size 32"):
        fake_quantize(torch.randn(4, 60))
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(torch.randn(4, 64), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(torch.randn(4, 64), group_size=0)


# ---- training/qat.py -------------------------------------------------------------------------------------

def _tiny(**overrides) -> MambaMoEForCausalLM:
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", **overrides))


def test_prepare_qat_targets_and_identity() -> None:
    model = _tiny()
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    before = model(x).logits
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before prepare_qat: must keep working
    names = prepare_qat(model, bits=4, group_size=32)
    assert is_qat(model)
    assert sorted(id(p) for p in model.parameters()) == sorted(id(p) for p in params.values())
    quantized = set(names)
    for kept in ("embed.weight", "embed.proj.weight", "backbone.final_norm.weight"):
        assert kept not in quantized
    for name in params:
        if any(k in name for k in ("norm", "router", "A_log", ".D", "dt_bias", "conv1d", "diff_lambda")):
            assert name not in quantized, name
    assert "backbone.layers.0.mixer.in_proj.weight" in quantized
    assert "backbone.layers.0.ffn.experts.up_proj" in quantized
    assert "backbone.layers.1.mixer.q_proj.weight" in quantized
    assert "backbone.layers.1.ffn.shared_expert.down_proj.weight" in quantized
    # the forward now sees the quantized weights: equal to a plain model holding fake_quantize(latent)
    after = model(x).logits
    assert not torch.allclose(after, before)
    reference = copy.deepcopy(model)
    convert_qat(reference)
    assert torch.equal(reference(x).logits, after)
    # gradients reach the latent parameters, and the optimizer built before updates them
    latent = params["backbone.layers.0.mixer.in_proj.weight"].detach().clone()
    after.float().pow(2).mean().backward()
    assert params["backbone.layers.0.mixer.in_proj.weight"].grad is not None
    opt.step()
    assert not torch.equal(params["backbone.layers.0.mixer.in_proj.weight"].detach(), latent)
    assert prepare_qat(model, bits=4, group_size=32) == names  # idempotent
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, bits=8, group_size=32)


def test_prepare_qat_skips_indivisible(caplog) -> None:
    model = _tiny()
    with caplog.at_level("WARNING"):
        names = prepare_qat(model, bits=8, group_size=128)  # d_model 64: rows of 64 cannot be blocked by 128
    assert "backbone.layers.0.mixer.in_proj.weight" not in names
    assert "backbone.layers.0.mixer.out_proj.weight" in names  # in = 128 (d_inner)
    assert "skipped" in caplog.text and "in_proj" in caplog.text


def test_convert_qat_leaves_quantized_plain_parameters() -> None:
    model = _tiny()
    names = prepare_qat(model, bits=4)
    latent = {k: v.clone() for k, v in plain_state_dict(model).items()}
    ids = sorted(id(p) for p in model.parameters())
    convert_qat(model)
    assert not is_qat(model)
    assert sorted(id(p) for p in model.parameters()) == ids
    state = model.state_dict()
    assert set(state) == set(latent)
    for name, value in state.items():
        expected = fake_quantize(latent[name], 4, 32) if name in names else latent[name]
        assert torch.equal(value, expected), name


def test_plain_state_dict_round_trip(tmp_path) -> None:
    model = _tiny()
    prepare_qat(model, bits=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()  # latent weights now differ from any init
    state = plain_state_dict(model)
    assert not any("parametrizations" in k for k in state)
    # saved like a checkpoint, loaded by from_pretrained (a plain model), prepared again: same everything
    plain = _tiny()
    load_state_dict_checked(plain, state, "qat state")
    plain.save_pretrained(tmp_path / "ckpt")
    again = MambaMoEForCausalLM.from_pretrained(tmp_path / "ckpt")
    for k, v in plain_state_dict(again).items():
        assert torch.equal(v, state[k]), k
    prepare_qat(again, bits=4)
    assert torch.equal(again(x).logits, model(x).logits)
    assert set(plain_state_dict(again)) == set(state)


# ---- the benefit (acceptance) ----------------------------------------------------------------------------

VOCAB = 32


def _sequences(n: int, length: int, gen: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """A fixed order-2 language: x_t = (3 x_{t-1} + 5 x_{t-2} + 1) mod 32, replaced by a random id 10 % of
    the time (entropy floor ~0.65 nats/token)."""
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=gen)
    for t in range(2, length):
        rule = (3 * x[:, t - 1] + 5 * x[:, t - 2] + 1) % VOCAB
        x[:, t] = torch.where(torch.rand(n, generator=gen) < noise, torch.randint(0, VOCAB, (n,), generator=gen), rule)
    return x


def _train(model: torch.nn.Module, steps: int, lr: float, seed: int) -> None:
    """AdamW, lr decaying linearly to 0 (so the last weights have settled), batches of 16 x 33 tokens."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        x = _sequences(16, 33, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def _eval(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    return sum(float(model(x, labels=x).loss) for x in batches) / len(batches)


def qat_benefit(seed: int, pretrain: int = 60, steps: int = 40) -> dict[str, float]:
    """Pretrain in float, continue ``steps`` (a) in float, (b) with 4-bit QAT from the same state; the
    float and 4-bit (Q4_0, groups of 32) eval losses of both on held-out sequences."""
    torch.manual_seed(seed)
    config = get_preset("mamba-moe-tiny", vocab_size=VOCAB, n_layers=2, layer_mixers=["mamba", "attention"],
                        layer_ffns=["moe", "moe"])
    base = MambaMoEForCausalLM(config)
    _train(base, pretrain, 1e-2, seed)
    plain, qat = copy.deepcopy(base), copy.deepcopy(base)
    _train(plain, steps, 2e-3, seed + 1)
    prepare_qat(qat, bits=4, group_size=32)
    _train(qat, steps, 2e-3, seed + 1)
    held_out = [_sequences(32, 33, torch.Generator().manual_seed(10_000 + i)) for i in range(4)]
    float_a = _eval(plain, held_out)
    ptq = copy.deepcopy(plain)
    prepare_qat(ptq, bits=4, group_size=32)
    convert_qat(ptq)                                   # fake_quantize applied to a copy of the float model
    quant_a = _eval(ptq, held_out)
    latent = MambaMoEForCausalLM(config)
    latent.load_state_dict(plain_state_dict(qat))      # the QAT model's float (latent) weights
    float_b = _eval(latent, held_out)
    convert_qat(qat)
    quant_b = _eval(qat, held_out)
    return {"float_a": float_a, "quant_a": quant_a, "float_b": float_b, "quant_b": quant_b,
            "gap_a": quant_a - float_a, "gap_b": quant_b - float_b}


def test_qat_narrows_the_quantization_gap() -> None:
    r = qat_benefit(seed=0)
    print({k: round(v, 4) for k, v in r.items()})
    assert all(v == v for v in r.values())  # no NaN
    assert r["float_a"] < 2.0 and r["float_b"] < 2.0, "the models did not learn (ln 32 = 3.47)"
    assert r["gap_a"] > 0, "4-bit rounding should cost the float-trained model something"
    assert r["gap_b"] < r["gap_a"]
    assert r["quant_b"] < r["quant_a"] + 0.01  # and the QAT model's 4-bit loss is no worse than PTQ's
