"""Logit distillation: the loss against its formula, teachers (ours, transformers, GGUF), top-k on disk."""

from __future__ import annotations

import inspect
import json
import time

import pytest
import torch
import torch.nn.functional as F
from helpers.distill import text_windows, tiny_model

from mamba_moe.data.tokenizer import train_tokenizer
from mamba_moe.training.distill import (
    DistillationError,
    check_same_vocabulary,
    distillation_loss,
    load_teacher,
    smollm2_gguf_path,
)
from mamba_moe.training.teacher_topk import TeacherTopK, precompute_teacher_topk, topk_distillation_loss

pytestmark = pytest.mark.usefixtures("one_thread")




# ---- the loss --------------------------------------------------------------------------------------------

def _formula(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, temp: float, ignore: int = -100):
    """Written out position by position: alpha*CE + (1-alpha)*T^2*KL(p_t || p_s) at T, mean over kept."""
    ce_sum = kl_sum = 0.0
    n = 0
    for pos in range(y.numel()):
        target = int(y.reshape(-1)[pos])
        if target == ignore:
            continue
        logits_s = s.reshape(-1, s.shape[-1])[pos]
        logits_t = t.reshape(-1, t.shape[-1])[pos]
        ce_sum = ce_sum - torch.log(torch.exp(logits_s[target]) / torch.exp(logits_s).sum())
        p = torch.exp(logits_t / temp) / torch.exp(logits_t / temp).sum()
        q = torch.exp(logits_s / temp) / torch.exp(logits_s / temp).sum()
        kl_sum = kl_sum + (p * torch.log(p / q)).sum()
        n += 1
    ce, kl = ce_sum / n, kl_sum / n
    return alpha * ce + (1 - alpha) * temp ** 2 * kl, ce, kl


@pytest.mark.parametrize("alpha,temp", [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0), (0.3, 0.7)])
def test_distillation_loss_matches_formula(alpha, temp) -> None:
    s = torch.randn(2, 5, 11, dtype=torch.float64) * 2
    t = torch.randn(2, 5, 11, dtype=torch.float64) * 2
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = y[1, 4] = -100
    total, parts = distillation_loss(s, t, y, alpha, temp)
    expected, ce, kl = _formula(s, t, y, alpha, temp)
    assert total.dtype == torch.float64
    assert abs(float(total - expected)) < 1e-10
    assert abs(float(parts["ce"] - ce)) < 1e-10 and abs(float(parts["kl"] - kl)) < 1e-10
    if alpha == 1.0:
        assert abs(float(total - F.cross_entropy(s.view(-1, 11), y.view(-1)))) < 1e-10
    if alpha == 0.0:
        assert abs(float(total - temp ** 2 * kl)) < 1e-10


def test_distillation_loss_ignores_masked_positions_and_grads_student_only() -> None:
    s = torch.randn(3, 4, 9, requires_grad=True)
    t = torch.randn(3, 4, 9, requires_grad=True)
    y = torch.randint(0, 9, (3, 4))
    y[:, 0] = -100
    total, _ = distillation_loss(s, t, y, 0.5, 2.0)
    s2, t2 = s.detach().clone(), t.detach().clone()
    s2[:, 0] = 1e3 * torch.randn(3, 9)
    t2[:, 0] = float("nan")                    # garbage where the target is ignored changes nothing
    total2, _ = distillation_loss(s2, t2, y, 0.5, 2.0)
    assert torch.isfinite(total2) and abs(float(total.detach() - total2)) < 1e-6
    total.backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad[:, 0].abs().max() == 0 and s.grad[:, 1:].abs().max() > 0
    none, parts = distillation_loss(s, t, torch.full_like(y, -100), 0.5, 2.0)  # nothing to learn: 0, not NaN
    assert float(none.detach()) == 0.0 and float(parts["kl"]) == 0.0


def test_distillation_loss_vocab_rows() -> None:
    s = torch.randn(2, 3, 12, dtype=torch.float64)
    t = torch.randn(2, 3, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 3))
    # a narrower teacher: its missing rows are probability 0, i.e. as if padded with -inf logits
    padded = torch.cat([t, torch.full((2, 3, 2), float("-inf"), dtype=torch.float64)], -1)
    total, _ = distillation_loss(s, t, y, 0.4, 2.0)
    total_padded, _ = distillation_loss(s, padded, y, 0.4, 2.0)
    assert torch.isfinite(total) and abs(float(total - total_padded)) < 1e-12
    with pytest.raises(DistillationError, match=r"14 rows.*12"):
        distillation_loss(s, torch.randn(2, 3, 14, dtype=torch.float64), y, 0.4, 2.0)
    with pytest.raises(DistillationError, match="targets"):
        distillation_loss(s, t, y[:, :2], 0.4, 2.0)
    with pytest.raises(DistillationError, match="alpha"):
        distillation_loss(s, t, y, 1.5, 2.0)


# ---- teachers --------------------------------------------------------------------------------------------

def test_load_teacher_errors(tmp_path) -> None:
    with pytest.raises(DistillationError, match="nowhere"):
        load_teacher(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillationError, match="config.json"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DistillationError, match="weights.bin.*unsupported"):
        load_teacher(tmp_path / "weights.bin")


def test_vocabulary_mismatch_is_a_clear_error(tokenizer) -> None:
    check_same_vocabulary(tokenizer, tokenizer)
    other = train_tokenizer([inspect.getsource(json)] * 3, vocab_size=300)
    with pytest.raises(DistillationError, match=r"512 tokens.*300.*distill generate") as err:
        check_same_vocabulary(tokenizer, other)
    assert "id " in str(err.value)


def test_hf_directory_teacher(tmp_path, tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(str(tmp_path / "hf"))
    teacher = load_teacher(tmp_path / "hf")
    assert teacher.kind == "hf" and teacher.vocab_size == len(tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 7))
    logits = teacher.logits(x)
    assert logits.shape == (2, 7, len(tokenizer)) and logits.dtype == torch.float32 and not logits.requires_grad
    assert torch.equal(logits, teacher.model(input_ids=x).logits.detach())


def _mean_kl(student, teacher_logits: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        _, parts = distillation_loss(student(x).logits, teacher_logits, x, 0.0, 1.0)
    return float(parts["kl"])


def test_tiny_teacher_distillation_kl_falls(teacher_dir, tokenizer) -> None:
    teacher = load_teacher(teacher_dir)
    assert teacher.kind == "mamba-moe" and teacher.vocab_size == 512
    check_same_vocabulary(teacher.tokenizer, tokenizer)
    train = text_windows(tokenizer, 16, 48, offset=40)
    held_out = text_windows(tokenizer, 4, 48, offset=60)
    train_t, held_t = teacher.logits(train), teacher.logits(held_out)
    student = tiny_model(len(tokenizer), seed=7)
    start = _mean_kl(student, held_t, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in range(30):
        rows = slice((step * 4) % 16, (step * 4) % 16 + 4)
        targets = torch.cat([train[rows, 1:], torch.full((4, 1), -100)], 1)  # next token; none after the end
        loss, parts = distillation_loss(student(train[rows]).logits, train_t[rows], targets, 0.2, 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _mean_kl(student, held_t, held_out)
    print(f"tiny teacher: held-out KL(teacher || student) {start:.3f} -> {end:.3f}")
    assert end < 0.7 * start


# ---- teacher top-k on disk --------------------------------------------------------------------------------

def test_topk_roundtrip_and_loss(tmp_path, teacher_dir, tokenizer) -> None:
    teacher = load_teacher(teacher_dir)
    windows = [text_windows(tokenizer, 3, 20), text_windows(tokenizer, 2, 20, offset=5)[0],
               text_windows(tokenizer, 2, 20, offset=9)]  # a batch, a single window, a batch: 6 entries
    out = precompute_teacher_topk(teacher, windows, k=8, out_dir=tmp_path / "topk", windows_per_shard=4)
    topk = TeacherTopK(out)
    assert len(topk) == 6 and topk.k == 8 and len(topk.manifest["shards"]) == 2
    rows = torch.cat([windows[0], windows[1][None], windows[2]])
    for i in range(6):
        values, indices = topk[i]
        expected = F.log_softmax(teacher.logits(rows[i:i + 1])[0], -1).topk(8, -1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
        assert indices.dtype == torch.long and torch.equal(topk.tokens(i), rows[i])
    with pytest.raises(DistillationError, match="window 2"):
        topk.batch([2, 3], check_tokens=rows[3:5])
    # with k = the whole vocabulary the top-k loss is the full loss
    full = precompute_teacher_topk(teacher, [rows[:2]], k=teacher.vocab_size, out_dir=tmp_path / "full")
    values, indices = TeacherTopK(full).batch([0, 1], check_tokens=rows[:2])
    student = torch.randn(2, 20, teacher.vocab_size, dtype=torch.float64)
    targets = rows[:2].roll(-1, 1)
    targets[:, -1] = -100
    a, pa = topk_distillation_loss(student, values.double(), indices, targets, 0.3, 2.0)
    b, pb = distillation_loss(student, teacher.logits(rows[:2]).double(), targets, 0.3, 2.0)
    assert abs(float(a - b)) < 1e-5 * float(b) and abs(float(pa["kl"] - pb["kl"])) < 1e-5 * float(pb["kl"])
    # small k: still >= 0 and finite
    v8, i8 = topk.batch([0, 1])
    c, pc = topk_distillation_loss(student, v8, i8, targets, 0.0, 1.0)
    assert torch.isfinite(c) and float(pc["kl"]) >= 0


def test_topk_interrupted_write_leaves_nothing_readable(tmp_path, teacher_dir, tokenizer) -> None:
    teacher = load_teacher(teacher_dir)
    good = precompute_teacher_topk(teacher, [text_windows(tokenizer, 2, 16)], k=4, out_dir=tmp_path / "t")

    def failing():
        yield text_windows(tokenizer, 2, 16, offset=3)
        yield text_windows(tokenizer, 2, 16, offset=5)
        raise KeyboardInterrupt("killed mid-way")

    with pytest.raises(KeyboardInterrupt):
        precompute_teacher_topk(teacher, failing(), k=4, out_dir=tmp_path / "t", windows_per_shard=1)
    assert len(TeacherTopK(good)) == 2  # the previous, complete result is untouched
    assert torch.equal(TeacherTopK(good).tokens(0), text_windows(tokenizer, 2, 16)[0])
    with pytest.raises(KeyboardInterrupt):
        precompute_teacher_topk(teacher, failing(), k=4, out_dir=tmp_path / "fresh", windows_per_shard=1)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DistillationError, match="manifest.json: missing"):
        TeacherTopK(tmp_path / "fresh")
    (good / "shard-00000.safetensors").unlink()  # damage after the fact: named, not silently wrong
    with pytest.raises(DistillationError, match="shard-00000"):
        TeacherTopK(good)


# ---- the real teacher: SmolLM2-135M-Instruct (GGUF) -------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A list in Python can hold items of different types, such as numbers and strings.",
    "The sun rises in the east and sets in the west every day.",
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except DistillationError as err:
        pytest.skip(f"SmolLM2 teacher unavailable: {err}")
    start = time.perf_counter()
    teacher = load_teacher("smollm2")  # first use converts the GGUF into the mamba-moe cache (~30-50 s)
    print(f"SmolLM2 teacher loaded in {time.perf_counter() - start:.1f}s")
    return teacher


@pytest.mark.slow
def test_smollm2_teacher_distillation_kl_falls(smollm2) -> None:
    teacher = smollm2
    assert teacher.kind == "gguf" and teacher.vocab_size == len(teacher.tokenizer) == 49152
    start_time = time.perf_counter()
    rows = [teacher.tokenizer(s, add_special_tokens=False)["input_ids"][:12] for s in SENTENCES]
    x = torch.tensor([r + [r[-1]] * (12 - len(r)) for r in rows])          # (6, 12)
    teacher_logits = teacher.logits(x)                                   # the teacher runs once
    assert teacher_logits.shape == (6, 12, 49152) and torch.isfinite(teacher_logits).all()
    train, held = slice(0, 4), slice(4, 6)
    student = tiny_model(teacher.vocab_size, seed=3)
    targets = torch.cat([x[:, 1:], torch.full((6, 1), -100)], 1)
    def kls() -> tuple[float, float]:
        return (_mean_kl(student, teacher_logits[train], x[train]), _mean_kl(student, teacher_logits[held], x[held]))

    start_train, start_held = kls()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    for _ in range(20):
        loss, _ = distillation_loss(student(x[train]).logits, teacher_logits[train], targets[train], 0.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end_train, end_held = kls()
    print(f"SmolLM2 teacher: KL(teacher || student) on the 4 training sentences {start_train:.3f} -> {end_train:.3f}, "
          f"on 2 held-out ones {start_held:.3f} -> {end_held:.3f} ({time.perf_counter() - start_time:.1f}s)")
    assert end_train < 0.3 * start_train
    assert end_held < 0.9 * start_held  # 4 sentences teach little beyond themselves, but what they teach carries


def test_cli_distill_topk(tmp_path, teacher_dir, tokenizer, capsys) -> None:
    from mamba_moe.cli import main
    from mamba_moe.data import PackedDataset, prepare_stdlib

    prepare_stdlib(tokenizer.name_or_path, tmp_path / "shards", max_docs=4, workers=1, val_fraction=0.0)
    out = tmp_path / "topk"
    assert main(["distill", "topk", "--teacher", str(teacher_dir), "--data", str(tmp_path / "shards"),
                 "--seq-len", "16", "--k", "4", "--max-windows", "5", "--batch-size", "2", "--out", str(out)]) == 0
    assert "top-4 of 5 windows" in capsys.readouterr().out
    topk, data = TeacherTopK(out), PackedDataset(tmp_path / "shards", 16)
    teacher = load_teacher(teacher_dir)
    assert len(topk) == 5 and topk.manifest["metadata"]["seq_len"] == 16
    for i in range(5):
        ids = torch.as_tensor(data.window(*data.locate(i))[0][:-1])
        assert torch.equal(topk.tokens(i), ids)
        values, indices = topk[i]
        expected = F.log_softmax(teacher.logits(ids[None])[0], -1).topk(4, -1)
        assert torch.allclose(values, expected.values, atol=1e-5) and torch.equal(indices, expected.indices)
