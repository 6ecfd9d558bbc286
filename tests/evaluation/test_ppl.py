"""Perplexity: rolling windows as lm-eval defines them, log-likelihoods equal to the model's own loss, and
bits per byte computed from totals."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_moe.evaluation.backends.base import rolling_windows, split_pair
from mamba_moe.evaluation.backends.checkpoint import CheckpointBackend
from mamba_moe.evaluation.tasks.ppl import Perplexity, load_documents, stdlib_heldout

TEXT = ("state space layers carry a fixed-size memory while attention layers look back at every key. "
        "Hello! How are you today? I am fine, thank you. <|endoftext|> Numbers: 0 1 2 3 4 5.")


@pytest.fixture(scope="module")
def backend(toy_checkpoint, one_thread):
    return CheckpointBackend(toy_checkpoint, dtype="float64")


def model_nll(backend, ids):
    """Sum of -log P over ``ids`` after the prefix token, through the model's own loss (labels)."""
    seq = torch.tensor([[backend.prefix_id] + ids])
    with torch.inference_mode():
        loss = backend.engine.model(seq, labels=seq).loss
    return float(loss) * len(ids)


@pytest.mark.parametrize("n, max_len", [(10, 4), (1, 4), (4, 4), (5, 4), (37, 8), (100, 1), (7, 100)])
def test_rolling_windows_match_lm_eval(n, max_len):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n))
    prefix = 7
    theirs = [utils.make_disjoint_window(w) for w in
              utils.get_rolling_token_windows(tokens, prefix_token=prefix, max_seq_len=max_len, context_len=1)]
    seq = [prefix] + tokens
    ours = []
    for in_start, start, end in rolling_windows(n, max_len):
        unit = seq[in_start:end + 1]
        context, scored = unit[:-1], unit[-(end - start):]
        ours.append((context[: len(context) - (end - start) + 1], scored))
    # lm-eval gives (context, continuation) with the model input = (context + continuation)[:-1]
    assert [(c + s)[:-1] for c, s in ours] == [(c + s)[:-1] for c, s in theirs]
    assert [s for _, s in ours] == [s for _, s in theirs]
    assert sum(len(s) for _, s in ours) == n     # every token once


def test_rolling_nll_is_the_models_loss(backend):
    ids = backend.encode_text(TEXT)
    assert len(ids) < backend.max_context
    (score,) = backend.rolling_loglikelihood([TEXT])
    assert score.tokens == len(ids)
    assert score.nll == pytest.approx(model_nll(backend, ids), rel=1e-9)


def test_windows_shorter_than_the_document(backend):
    ids = backend.encode_text(TEXT)
    full = backend.rolling_loglikelihood([TEXT])[0].nll
    saved = backend.max_context
    try:
        backend.max_context = 8
        windowed = backend.rolling_loglikelihood([TEXT])[0]
    finally:
        backend.max_context = saved
    assert windowed.tokens == len(ids)
    # each window through the model's own loss, only its new tokens labelled (windows checked against lm-eval above)
    seq = [backend.prefix_id] + ids
    expected = 0.0
    for in_start, start, end in rolling_windows(len(ids), 8):
        window = torch.tensor([seq[in_start:end + 1]])
        labels = window.clone()
        labels[0, : window.shape[1] - (end - start)] = -100
        with torch.inference_mode():
            expected += float(backend.engine.model(window, labels=labels).loss) * (end - start)
    assert windowed.nll == pytest.approx(expected, rel=1e-9)
    assert windowed.nll != pytest.approx(full, rel=1e-6)   # less context, another number


def test_loglikelihood_of_a_continuation_is_the_models_loss(backend):
    context, continuation = "Hello! How are", " you today?"
    (ll,) = backend.loglikelihood([(context, continuation)])
    ctx, cont = split_pair(backend.encode_text, context, continuation)
    seq = torch.tensor([ctx + cont])
    labels = seq.clone()
    labels[0, :len(ctx)] = -100
    with torch.inference_mode():
        loss = backend.engine.model(seq, labels=labels).loss
    assert ll.tokens == len(cont)
    assert ll.logprob == pytest.approx(-float(loss) * len(cont), rel=1e-9)


def test_bits_per_byte_from_totals(backend, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "abc abc abc", "domain": "a"}\n{"text": "x", "domain": "b"}\n')
    task = Perplexity({"data": str(path)})
    items = task.items(backend, None)
    scores = backend.rolling_loglikelihood([i.request.text for i in items])
    verdicts = task.score(items, scores)
    result = task.aggregate([{"meta": i.meta, "verdict": v} for i, v in zip(items, verdicts, strict=True)])
    nll = sum(s.nll for s in scores)
    assert result["value"] == pytest.approx(nll / math.log(2) / 12)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / sum(s.tokens for s in scores)))
    assert result["domains"]["b"]["ci95"] == [None, None]      # one document: no interval claimed
    assert load_documents(str(path))[1] == ("docs.jsonl:1", "b", "x")


def test_default_text_is_the_stdlib_validation_split():
    from mamba_moe.data.split import content_digest, is_validation

    docs = stdlib_heldout()
    assert 5 <= len(docs) <= 60
    assert all(is_validation(content_digest(text), 0, 0.01) for _, _, text in docs)
