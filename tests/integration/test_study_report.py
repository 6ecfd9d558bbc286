"""bench/study_report.py: the study's tables come from the trainer's metrics records, computed right."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("study_report", ROOT / "bench" / "study_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_become_curves_and_a_summary(report, tmp_path, fresh_seed) -> None:
    import random

    rng = random.Random(fresh_seed)
    step_tokens = 1000
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s": rng.uniform(500, 2000)} for s in range(1, 21)]
    for r in records[4::5]:
        r["val_loss"] = r["loss"] + 0.5
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"step": 3, "event": "diverged", "what": "loss", "loss": "nan"}')
    path = tmp_path / "m.metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 21, "lo')            # a torn last line
    read = report.read_metrics(path)
    assert [r["step"] for r in read] == list(range(1, 21))
    c = report.curves(read, step_tokens)
    assert c["val_tokens"] == [5000, 10000, 15000, 20000]
    assert c["seconds"][-1] == pytest.approx(sum(step_tokens / r["tokens_per_s"] for r in records))
    s = report.summary("m", read, step_tokens, bytes_per_token=4.0)
    rates = sorted(r["tokens_per_s"] for r in records[2:])
    assert s["tok_s"] == rates[len(rates) // 2] and s["tokens"] == 20_000
    assert s["bpb"] == pytest.approx(records[-1]["val_loss"] / math.log(2) / 4.0)


def test_qat_rows_are_compared_on_their_own_tokens_and_each_base_gets_its_table(report, tmp_path, fresh_seed) -> None:
    import random

    rng = random.Random(fresh_seed)
    forms = ["float", "fake-q4_0", "gguf-f32", "gguf-q4_k_m"]
    for tag in ("", ".hybrid-topk"):
        rows = {f"{arm}{tag}/{form}": {"loss": rng.uniform(2.5, 3.5), "bits_per_byte": 1.0}
                for arm in ("qat-on", "qat-off") for form in forms}
        (tmp_path / f"qat{tag}.json").write_text(json.dumps({"windows": 8, "seq": 8192, "rows": rows}))
    (tmp_path / "qat.hybrid-dense.json.bak").write_text("{}")                  # not a result file
    found = report.measured_from(tmp_path, "qat")
    assert [name for name, _ in found] == ["hybrid-soft", "hybrid-topk"]
    data = json.loads(found[1][1].read_text())
    table = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line.strip("|").split("|")
             for line in report.qat_table(data, "hybrid-topk") if line.startswith("| qat-")}
    r = data["rows"]
    on_q4, on_f32 = r["qat-on.hybrid-topk/gguf-q4_k_m"]["loss"], r["qat-on.hybrid-topk/gguf-f32"]["loss"]
    off_f32 = r["qat-off.hybrid-topk/gguf-f32"]["loss"]
    row = table[("qat-on", "gguf-q4_k_m")]
    assert float(row[5]) == pytest.approx(on_q4 - off_f32, abs=6e-5)       # vs the control on the same tokens
    assert float(row[6]) == pytest.approx(on_q4 - on_f32, abs=6e-5)        # the 4-bit increase of its own arm
    fake = table[("qat-off", "fake-q4_0")]
    assert float(fake[6]) == pytest.approx(r["qat-off.hybrid-topk/fake-q4_0"]["loss"]
                                           - r["qat-off.hybrid-topk/float"]["loss"], abs=6e-5)
    assert table[("qat-off", "float")][6].strip() == ""                    # a float row has no increase
