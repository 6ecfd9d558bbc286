"""The GSM8K task: seeded exemplars in the dataset's format for base models, zero-shot chat, scoring."""

from __future__ import annotations

import json

import pytest

from mamba_moe.evaluation.backends.base import GenResult
from mamba_moe.evaluation.tasks.gsm8k import GSM8K, clean_solution


def test_base_prompts_are_seeded_fewshot_in_the_dataset_format(gsm8k_dir):
    task = GSM8K({"num_fewshot": "3"}, seed=7, data_dir=str(gsm8k_dir))
    items = task.items(None, None)
    train = [json.loads(line) for line in (gsm8k_dir / "gsm8k" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (gsm8k_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(items) == len(test) == 6
    assert len(set(task.exemplars)) == 3 and task.settings()["exemplars"] == task.exemplars
    same = GSM8K({"num_fewshot": "3"}, seed=7, data_dir=str(gsm8k_dir))
    same.items(None, None)
    other = GSM8K({"num_fewshot": "3"}, seed=8, data_dir=str(gsm8k_dir))
    other.items(None, None)
    assert same.exemplars == task.exemplars and other.exemplars != task.exemplars
    prompt = items[0].request.prompt
    for i in task.exemplars:
        assert f"Question: {train[i]['question']}\nAnswer: {clean_solution(train[i]['answer'])}\n\n" in prompt
    assert prompt.endswith(f"Question: {test[0]['question']}\nAnswer:")
    assert "<<" not in prompt and prompt.count("####") == 3
    assert items[0].target == test[0]["answer"].rsplit("#### ", 1)[1].replace(",", "")
    assert "Question:" in items[0].request.stop and items[0].request.temperature == 0


def test_chat_is_zero_shot(gsm8k_dir):
    task = GSM8K(seed=7, chat=True, data_dir=str(gsm8k_dir))
    item = task.items(None, 2)[1]
    ((role, content),) = item.request.messages
    assert role == "user" and "####" in content and "Answer:" not in content
    assert "num_fewshot" not in task.settings() and task.settings()["mode"] == "chat"


def test_scoring(gsm8k_dir):
    task = GSM8K({"num_fewshot": "0"}, data_dir=str(gsm8k_dir))
    item = task.items(None, 1)[0]
    outputs = [GenResult(f" {item.target} - 1 = x\n#### {item.target}"), GenResult("#### 0"), GenResult(""),
               GenResult("", "error", "prompt: 5000 tokens, the context holds 4096"),
               GenResult(f"I am not sure, maybe {item.target}")]
    verdicts = task.score([item] * 5, outputs)
    assert [v["correct"] for v in verdicts] == [True, False, False, False, True]
    assert verdicts[3]["error"].startswith("prompt:") and verdicts[4]["method"] == "last number"
    result = task.aggregate([{"verdict": v} for v in verdicts])
    assert result["value"] == pytest.approx(0.4) and result["strict_match"] == pytest.approx(0.2)
    assert result["errors"] == 1 and result["n"] == 5
