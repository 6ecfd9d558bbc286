"""lm-evaluation-harness drives our checkpoint as ``--model mamba-moe`` through its own command line, on local
task YAMLs over a local JSON-lines file (no hub), and its log-likelihoods equal ours and the model's loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mamba_moe.evaluation.backends.base import split_pair
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend

pytest.importorskip("lm_eval")

DOCS = [
    {"context": "The quick brown fox", "target": " jumps over the lazy dog.", "question": "Numbers: 0 1 2",
     "answer": " 3", "text": "Hello! How are you today? I am fine, thank you."},
    {"context": "A small model reads", "target": " text one token at a time.", "question": "Hello!",
     "answer": " How", "text": "state space layers carry a fixed-size memory while attention layers look back."},
    {"context": "", "target": "Punctuation, quotes and (brackets).", "question": "The sky is",
     "answer": " blue", "text": "Non-ASCII text: café, naïve, Größe, 東京 — all bytes in the end."},
]
TASKS = {
    "mm_loglikelihood": 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                        "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "mm_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                  "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "mm_generate": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                   'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
                   "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def lm_eval_run(toy_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {data}\ntest_split: test\n{body}")
    out = root / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mamba_moe", "lm-eval", "run", "--model", "mamba-moe", "--model_args",
           f"pretrained={toy_checkpoint},dtype=float64", "--tasks", *TASKS, "--include_path", str(tasks),
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = {}
    for name in TASKS:
        (path,) = out.rglob(f"samples_{name}_*.jsonl")
        samples[name] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda r: r["doc_id"])
    (results,) = out.rglob("results_*.json")
    return samples, json.loads(results.read_text())


@pytest.fixture(scope="module")
def ours(toy_checkpoint, one_thread):
    return CheckpointBackend(toy_checkpoint, dtype="float64")


def test_loglikelihood_equals_ours_and_the_models_loss(lm_eval_run, ours):
    samples, results = lm_eval_run
    assert "mm_loglikelihood" in results["results"]
    for doc, record in zip(DOCS, samples["mm_loglikelihood"], strict=True):
        logprob, greedy = record["resps"][0][0]
        (mine,) = ours.loglikelihood([(doc["context"], doc["target"])])
        assert float(logprob) == pytest.approx(mine.logprob, rel=1e-12)
        assert (greedy == "True") is mine.is_greedy
        ctx, cont = split_pair(ours.encode_text, doc["context"], doc["target"])
        seq = torch.tensor([(ctx or [ours.prefix_id]) + cont])
        labels = seq.clone()
        labels[0, : seq.shape[1] - len(cont)] = -100
        with torch.inference_mode():
            loss = ours.engine.model(seq, labels=labels).loss
        assert float(logprob) == pytest.approx(-float(loss) * len(cont), rel=1e-9)


def test_rolling_loglikelihood_equals_our_ppl_scores(lm_eval_run, ours):
    samples, results = lm_eval_run
    for doc, record in zip(DOCS, samples["mm_rolling"], strict=True):
        (mine,) = ours.rolling_loglikelihood([doc["text"]])
        assert float(record["resps"][0][0]) == pytest.approx(-mine.nll, rel=1e-12)
    nll = sum(ours.rolling_loglikelihood([d["text"]])[0].nll for d in DOCS)
    nbytes = sum(len(d["text"].encode()) for d in DOCS)
    bpb = results["results"]["mm_rolling"]["bits_per_byte,none"]
    assert bpb == pytest.approx(nll / nbytes / torch.log(torch.tensor(2.0, dtype=torch.float64)).item(), rel=1e-9)


def test_generate_until_equals_our_engine(lm_eval_run, ours):
    from mamba_moe.inference import SamplingParams

    samples, _ = lm_eval_run
    for doc, record in zip(DOCS, samples["mm_generate"], strict=True):
        expected = ours.engine.generate(doc["question"], SamplingParams(max_tokens=8, temperature=0, stop=("\n",)))
        assert record["resps"][0][0] == expected.text
