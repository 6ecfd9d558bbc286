"""``Backend.choose``: a chat's candidate answers scored as the answer turn SFT trains on, and the memory task's
choice reader built on it."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mamba_moe.data import memory_dialogues as md
from mamba_moe.data.chat import ChatEncoder
from mamba_moe.evaluation.backends.base import Backend, BackendInfo, ChoiceRequest, GenResult
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.backends.scoring import choices
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.runner import run_eval
from mamba_moe.evaluation.tasks import task_class
from mamba_moe.memory.reader import is_abstention
from mamba_moe.memory.slots import ABSTAIN

TOLERANCE = 1e-4   # nats: float32 against float32 (a left-padded batch, transformers, llama.cpp; seen: <= 1e-5)


@pytest.fixture(scope="module")
def backend(toy_checkpoint):
    return CheckpointBackend(toy_checkpoint)


def _reference(backend, messages, choice):
    """log P(answer turn) from the training encoding of the whole chat: one forward, the loss mask's positions."""
    chat = [{"role": r, "content": c} for r, c in messages] + [{"role": "assistant", "content": choice}]
    ids, mask = ChatEncoder(backend.engine.tokenizer).encode(chat)
    with torch.inference_mode():
        logits = backend.engine.model(torch.tensor([ids]), router_stats=False).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    scored = torch.tensor(mask[1:], dtype=torch.bool)
    return float(logprobs[scored].sum()), int(scored.sum())


def test_choose_scores_each_answer_turn_as_training_encodes_it(backend, fresh_seed):
    rng = random.Random(fresh_seed)
    words = ["Oslo", "Lisbon", "2025-04-13", "Peanut", "nurse", "<|im_end|>", "blue", "Zoë"]
    requests = []
    for _ in range(3):
        facts = "\n".join(f"- fact {rng.choice(words)} {rng.randint(0, 99)}" for _ in range(rng.randint(1, 5)))
        messages = (("system", f"Facts:\n{facts}"), ("user", f"Where is {rng.choice(words)}?"))
        choices = tuple(dict.fromkeys([*rng.sample(words, rng.randint(1, 4)), ABSTAIN]))
        requests.append(ChoiceRequest(messages, choices))
    results = backend.choose(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.error is None and len(result.logprobs) == len(request.choices)
        for choice, logprob, tokens in zip(request.choices, result.logprobs, result.tokens, strict=True):
            want, n = _reference(backend, request.messages, choice)
            assert tokens == n                                   # the content and <|im_end|>, nothing more
            assert logprob == pytest.approx(want, abs=TOLERANCE), choice


def test_a_prompt_longer_than_the_context_is_that_requests_error(backend):
    long = ChoiceRequest((("user", "word " * 2000),), ("a", "b"))
    short = ChoiceRequest((("user", "Where do I live?"),), ("Oslo", ABSTAIN))
    too_long, fine = backend.choose([long, short])
    assert too_long.error and "context holds 1024" in too_long.error and too_long.best is None
    assert fine.error is None and len(fine.logprobs) == 2


def test_choices_fit_the_context_exactly_and_errors_keep_the_others_in_place():
    """``scoring.choices`` at the boundary: the model reads prompt + answer - 1 tokens, so that many = max_len fits
    and one more does not; a refused request between others leaves their scores where they belong."""
    vocab, max_len = 7, 10
    logits_fn = lambda ids: torch.zeros(len(ids), vocab)              # noqa: E731 - uniform: -n log 7 a unit
    prompt_ids = lambda request: [0] * int(request.messages[0][1])    # noqa: E731 - the content is the length
    answer_ids = lambda text: [1] * len(text)                          # noqa: E731 - one token a character
    requests = [ChoiceRequest((("user", str(n)),), choices) for n, choices in
                [(8, ("ab", "abc")), (9, ("abc",)), (5, ("a", "abcd")), (4, ("abcdefgh", "a"))]]
    results = choices(logits_fn, prompt_ids, answer_ids, max_len, requests)
    assert [r.error is None for r in results] == [True, False, True, False]   # 8+3-1 fits, 9+3-1 and 4+8-1 do not
    assert "11 tokens to read" in results[1].error and "holds 10" in results[1].error
    for result, request in zip(results, requests, strict=True):
        if result.error is None:
            assert result.tokens == tuple(map(len, request.choices))
            assert result.logprobs == pytest.approx([-n * math.log(vocab) for n in result.tokens])
            assert result.best == 0                                     # the shortest is the likeliest here


def test_choice_request_checks_its_choices():
    with pytest.raises(ValueError, match="choices is empty"):
        ChoiceRequest((("user", "q"),), ())
    with pytest.raises(ValueError, match="choices repeat"):
        ChoiceRequest((("user", "q"),), ("Oslo", "Oslo"))


@pytest.mark.slow
def test_choice_reader_answers_with_a_shown_value_or_abstains(backend, tmp_path, fresh_seed):
    seed = fresh_seed % 1000
    report = run_eval(backend, ["memory"], tmp_path, seed=seed, chat=True,
                      options={"memory": {"conversations": "1", "sessions": "6", "reader": "choice"}})
    entry = report["tasks"]["memory"]
    records = [json.loads(line) for line in (tmp_path / "samples" / "memory.jsonl").read_text().splitlines()]
    (conversation,) = md.generate(md.EVAL_SEEDS.start + seed, 1, split="eval", config=md.DialogueConfig(sessions=6))
    assert len(records) == len(conversation.probes)
    for record, probe in zip(records, conversation.probes, strict=True):
        choices, logprobs = record["choices"], record["logprobs"]
        assert choices[-1] == ABSTAIN and len(logprobs) == len(choices)
        shown = [value for _, value in record["meta"]["prompt_facts"] if value]
        assert choices[:-1] == list(dict.fromkeys(shown))                  # the prompt's values, once each
        answer = record["verdict"]["answer"]
        assert answer == choices[max(range(len(logprobs)), key=logprobs.__getitem__)]   # the most likely
        assert record["verdict"].get("failure") not in ("garbled_copy",)                 # never a half copy
        assert record["verdict"]["correct"] == (is_abstention(answer) if probe.answer == ABSTAIN
                                                else answer.casefold() == probe.answer.casefold())
    recall = [r["verdict"]["correct"] for r, p in zip(records, conversation.probes, strict=True) if p.kind == "recall"]
    assert entry["value"] == (sum(recall) / len(recall) if recall else None)
    assert entry["settings"]["decoding"] == "most likely shown value or abstention"


class _WritesOnly(Backend):
    info = BackendInfo("openai", "http://example.invalid")

    def generate(self, requests):
        return [GenResult("") for _ in requests]


def test_choice_reader_is_skipped_on_a_backend_that_cannot_score(tmp_path):
    """Skipped with its reason, like ppl, without aborting the run; the greedy reader runs on the same backend."""
    options = {"memory": {"conversations": "1", "sessions": "4", "reader": "choice"}}
    report = run_eval(_WritesOnly(), ["memory", "ppl"], tmp_path / "choice", chat=True, options=options)
    assert report["tasks"]["memory"]["n"] == 0 and report["tasks"]["memory"]["value"] is None
    assert report["tasks"]["memory"]["skipped"].startswith("memory.reader=choice: the openai backend")
    assert "cannot score text" in report["tasks"]["ppl"]["skipped"]
    options["memory"]["reader"] = "model"
    report = run_eval(_WritesOnly(), ["memory"], tmp_path / "model", chat=True, options=options)
    assert "skipped" not in report["tasks"]["memory"] and report["tasks"]["memory"]["n"] > 0
    task = task_class("memory")(options={"reader": "choice"}, chat=True)      # asked directly, it refuses
    with pytest.raises(EvalError, match="memory.reader=choice: the openai backend"):
        task.items(_WritesOnly(), None)


def _chats(seed):
    rng = random.Random(seed)
    words = ["Oslo", "Montréal", "2025-04-13", "Peanut", "ice hockey", "Zoë"]
    return [ChoiceRequest((("system", "Facts:\n" + "\n".join(f"- The user likes {rng.choice(words)}."
                                                              for _ in range(rng.randint(1, 4)))),
                           ("user", f"What about {rng.choice(words)}?")),
                          tuple(dict.fromkeys([*rng.sample(words, 3), ABSTAIN])))
            for _ in range(3)]


def _same_choices(ours, theirs, tolerance):
    for a, b in zip(ours, theirs, strict=True):
        assert a.error is None and b.error is None
        assert a.tokens == b.tokens                                     # the same answer turns
        assert a.logprobs == pytest.approx(b.logprobs, abs=tolerance)
        assert a.best == b.best


@pytest.mark.slow
def test_transformers_chooses_as_our_checkpoint_does(backend, toy_checkpoint, tmp_path, fresh_seed):
    """The HF export through transformers (its chat template, its GraniteMoeHybrid) scores the same answer turns
    to float32 rounding: parity by log-probabilities with code nobody here wrote."""
    from mamba_moe.evaluation.backends.hf import HFBackend
    from mamba_moe.export.hf_export import export_hf

    export_hf(toy_checkpoint, tmp_path / "hf")
    requests = _chats(fresh_seed)
    _same_choices(backend.choose(requests), HFBackend(tmp_path / "hf").choose(requests), TOLERANCE)


@pytest.mark.slow
def test_llama_cpp_chooses_as_our_checkpoint_does(backend, toy_checkpoint, tmp_path, fresh_seed):
    """The f32 GGUF export through llama.cpp (its embedded template, its end-of-generation tokens) scores the
    same answer turns to float32 rounding (6e-6 nats at worst over 60 chats when measured)."""
    pytest.importorskip("llama_cpp")
    from mamba_moe.evaluation.backends.gguf import GGUFBackend
    from mamba_moe.export.gguf_export import export_gguf

    export_gguf(toy_checkpoint, tmp_path / "toy-f32.gguf", type="f32")
    gguf = GGUFBackend(tmp_path / "toy-f32.gguf", n_ctx=1024, threads=1)
    try:
        requests = _chats(fresh_seed)
        _same_choices(backend.choose(requests), gguf.choose(requests), TOLERANCE)
    finally:
        gguf.close()
