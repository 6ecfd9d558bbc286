"""Chunking keeps exact character spans; document search cites them; ModelEmbedder pools the model's states."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from mamba_moe.memory import MemoryStore
from mamba_moe.memory.documents import chunk_spans, chunk_title

_WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "quiet", "lamp", "north", "seven", "café", "東京"]


def _random_text(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 6)):
        sentences = []
        for _ in range(rng.randint(1, 8)):
            n = rng.choice([rng.randint(1, 12), rng.randint(30, 70)])   # some sentences longer than a chunk
            sentences.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice([".", "!", "?", ".)"]))
        paragraphs.append(rng.choice([" ", "  ", "\t"]).join(sentences))
    return rng.choice(["", "  \n"]) + rng.choice(["\n\n", "\n \n\n"]).join(paragraphs) + rng.choice(["", "\n"])


def test_chunk_spans_cover_the_text_with_exact_offsets(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(60):
        text = _random_text(rng)
        max_words, overlap = rng.randint(5, 40), 0
        overlap = rng.randint(0, max_words - 1)
        spans = chunk_spans(text, max_words=max_words, overlap_words=overlap)
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        covered = set()
        for i, span in enumerate(spans):
            piece = text[span.start:span.end]
            assert span.index == i and piece == piece.strip() and piece
            inside = [w for w in words if span.start <= w[0] and w[1] <= span.end]
            assert len(inside) <= max_words
            assert all(not (w[0] < span.start < w[1] or w[0] < span.end < w[1]) for w in words)   # no word cut
            covered.update(inside)
        assert covered == set(words)                                        # every word is in some chunk
        assert [s.start for s in spans] == sorted({s.start for s in spans})  # strictly moving on
        for a, b in zip(spans, spans[1:], strict=False):
            shared = [w for w in words if b.start <= w[0] and w[1] <= a.end]
            assert len(shared) <= overlap


def test_chunk_arguments_are_checked():
    with pytest.raises(ValueError, match="max_words"):
        chunk_spans("a b", max_words=0)
    with pytest.raises(ValueError, match="overlap_words"):
        chunk_spans("a b", max_words=3, overlap_words=3)
    assert chunk_spans("   \n\n ") == []
    assert chunk_title("q3-budget_notes.md") == "q3 budget notes md"


def test_document_hits_cite_exact_spans(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    text = "\n\n".join(f"Section {i}. " + " ".join(rng.choice(_WORDS) for _ in range(60)) + f" marker{i}."
                       for i in range(8))
    with MemoryStore(tmp_path / "m.db") as store:
        doc = store.add_document("alice", "field-notes.md", text, source="upload")
        assert store.list_documents("alice") == [(doc, "field-notes.md", len(chunk_spans(text)))]
        for i in range(8):
            for mode in ("bm25", "dense", "fused"):
                hits = store.search_documents("alice", f"marker{i}", k=3, mode=mode)
                assert hits and all(h.text == text[h.start:h.end] and h.name == "field-notes.md" for h in hits)
                assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
            assert f"marker{i}" in store.search_documents("alice", f"marker{i}", k=1)[0].text
        assert store.search_documents("bob", "marker1") == []


@pytest.mark.slow
def test_model_embedder_is_the_mean_of_the_final_hidden_states(tmp_path):
    from helpers.toy import save_toy_checkpoint

    from mamba_moe.memory import ModelEmbedder

    checkpoint = save_toy_checkpoint(tmp_path / "ckpt", seed=0)
    embedder = ModelEmbedder(checkpoint)
    texts = ["The quick brown fox.", "Hello! How are you today?", "   "]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert not vectors[2].any() or np.linalg.norm(vectors[2]) == pytest.approx(1.0, abs=1e-5)
    # reference: the full forward, with the final norm's output captured by a hook
    model, captured = embedder.model, []
    handle = model.backbone.final_norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        for i, text in enumerate(texts[:2]):
            ids = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
            captured.clear()
            with torch.inference_mode():
                model(torch.tensor([ids]))
            mean = captured[-1][0].double().mean(dim=0).numpy()
            np.testing.assert_allclose(vectors[i], mean / np.linalg.norm(mean), atol=1e-5)
    finally:
        handle.remove()
    assert embedder.name.startswith("model-mean-v1(ckpt:")
    # another checkpoint is another embedder, also when only a deep weight differs (a LoRA merge, say)
    from mamba_moe.memory.embedding import weights_fingerprint

    deep = list(model.parameters())[-1]
    before, saved = weights_fingerprint(model), deep.detach().clone()
    with torch.no_grad():
        deep.add_(1e-3)
        assert weights_fingerprint(model) != before
        deep.copy_(saved)
    assert weights_fingerprint(model) == before
    with MemoryStore(tmp_path / "m.db", embedder=embedder) as store:
        store.add("alice", "The quick brown fox.")
        assert store.search("alice", "quick fox", mode="dense")[0].record.text == "The quick brown fox."
