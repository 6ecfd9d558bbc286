"""retrieval.py's pure functions against plain references, and the default embedder's properties."""

from __future__ import annotations

import random
import sqlite3
import string

import numpy as np
import pytest

from mamba_moe.memory.embedding import HashedNgramEmbedder, normalise_rows
from mamba_moe.memory.retrieval import (
    MAX_QUERY_TERMS,
    Vocabulary,
    fts_match_expression,
    fuzzy_alternatives,
    one_edit_variants,
    osa_distance,
    query_terms,
    reciprocal_rank_fusion,
    top_k_cosine,
)


def _rrf_reference(rankings, k=60):
    items = {item for ranking in rankings for item in ranking}
    return {item: sum(1.0 / (k + ranking.index(item) + 1) for ranking in rankings if item in ranking)
            for item in items}


def test_reciprocal_rank_fusion_matches_the_formula(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(50):
        pool = list(range(rng.randint(1, 40)))
        rankings = [rng.sample(pool, rng.randint(0, len(pool))) for _ in range(rng.randint(1, 3))]
        fused = reciprocal_rank_fusion(rankings)
        reference = _rrf_reference(rankings)
        assert {item for item, _ in fused} == set(reference)
        for item, score in fused:
            assert score == pytest.approx(reference[item], rel=1e-12)
        assert all(a[1] >= b[1] for a, b in zip(fused, fused[1:], strict=False))
        assert fused == reciprocal_rank_fusion(rankings)   # deterministic


def test_fusion_rewards_agreement():
    fused = [item for item, _ in reciprocal_rank_fusion([["a", "b", "c"], ["c", "b", "d"]])]
    assert fused[:2] == ["b", "c"] or fused[:2] == ["c", "b"]
    assert fused.index("b") < fused.index("a") and fused.index("c") < fused.index("d")


def test_top_k_cosine_matches_a_full_sort(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    for _ in range(30):
        n, dim = int(rng.integers(1, 200)), 16
        matrix = normalise_rows(rng.standard_normal((n, dim)))
        matrix[rng.integers(0, n, size=n // 4)] = matrix[0]   # exact ties
        query = normalise_rows(rng.standard_normal((1, dim)))[0]
        mask = rng.random(n) < 0.7
        k = int(rng.integers(1, 30))
        scores = np.einsum("ij,j->i", matrix, query)   # the same products: the selection is under test
        exact = matrix.astype(np.float64) @ query.astype(np.float64)
        rows = [r for r in range(n) if mask[r]]
        expected = sorted(rows, key=lambda r: (-scores[r], r))[:k]
        got = top_k_cosine(matrix, query, k, mask)
        assert [r for r, _ in got] == expected
        for r, score in got:
            assert np.isfinite(score) and score == pytest.approx(exact[r], abs=1e-5)
    assert top_k_cosine(np.zeros((0, 4), np.float32), np.ones(4, np.float32), 3) == []


_HOSTILE = string.ascii_letters + string.digits + ' "\'*()^:-+{},.;\\/\x00\t\nNEARORANDNOTéü'


def test_match_expressions_of_hostile_text_always_parse(fresh_seed):
    rng = random.Random(fresh_seed)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(a, b, tokenize='unicode61 remove_diacritics 2')")
    conn.execute("INSERT INTO t (a, b) VALUES ('near or and not zoe', 'col text')")
    for _ in range(300):
        query = "".join(rng.choice(_HOSTILE) for _ in range(rng.randint(0, 30)))
        for expression in (fts_match_expression(query), fts_match_expression(query, require_all=True),
                           fts_match_expression(query, vocabulary=Vocabulary({"near": 1, "zoe": 1, "text": 1}, 4))):
            if expression is None:
                assert query_terms(query) == []
                continue
            conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)).fetchall()   # never raises


def test_match_semantics():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='unicode61 remove_diacritics 2')")
    conn.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)", [(1, "Zoë likes red apples"), (2, "red cars"),
                                                                (3, "NEAR OR")])

    def match(expression):
        return sorted(r[0] for r in conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)))

    assert match(fts_match_expression("zoe RED")) == [1, 2]                    # OR, case/diacritics folded
    assert match(fts_match_expression("red apples", require_all=True)) == [1]   # AND
    assert match(fts_match_expression('"a" OR NEAR(')) == [3]                  # operators are words
    vocabulary = Vocabulary({"zoe": 1, "likes": 1, "red": 2, "apples": 1, "cars": 1, "near": 1, "or": 1}, 3)
    assert match(fts_match_expression("appels", vocabulary=vocabulary)) == [1]   # a typo corrected
    assert fts_match_expression("red apples", vocabulary=vocabulary) == '"apples"'   # in 2 of 3 rows: no weight
    assert fts_match_expression("red", vocabulary=vocabulary) == '"red"'              # unless nothing is left
    assert len(query_terms(" ".join(f"w{i}" for i in range(500)))) == MAX_QUERY_TERMS


def _osa_distance(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein + adjacent swaps), the plain dynamic programme."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_one_edit_variants_are_exactly_one_edit_away(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(20):
        term = "".join(rng.choice("abcdexyz") for _ in range(rng.randint(1, 7)))
        variants = one_edit_variants(term)
        assert term not in variants
        assert all(_osa_distance(term, v) == 1 for v in variants)
        for _ in range(30):   # completeness on random single edits
            i = rng.randrange(len(term) + 1)
            c = rng.choice(string.ascii_lowercase)
            edits = [term[:i] + c + term[i:]]
            if i < len(term):
                edits += [term[:i] + term[i + 1:], term[:i] + c + term[i + 1:]]
            if i + 1 < len(term):
                edits.append(term[:i] + term[i + 1] + term[i] + term[i + 2:])
            assert all(e in variants for e in edits if e != term)


def test_osa_distance_with_a_limit_matches_the_plain_programme(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(300):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 8)))
        limit = rng.randint(0, 3)
        assert osa_distance(a, b, limit) == min(_osa_distance(a, b), limit + 1)


def test_two_edit_words_are_the_bucketed_words_within_two_edits(fresh_seed):
    rng = random.Random(fresh_seed)
    words = {"".join(rng.choice("abcdef") for _ in range(rng.randint(3, 9))): 1 for _ in range(400)}
    vocabulary = Vocabulary(dict(words), 400)
    for _ in range(40):
        term = "".join(rng.choice("abcdef") for _ in range(rng.randint(6, 9)))
        expected = sorted(w for w in words if len(w) >= 4 and _osa_distance(term, w) <= 2
                          and (w[:2] == term[:2] or w[-2:] == term[-2:]))
        assert vocabulary.two_edit_words(term) == expected
    vocabulary.add(["abcdefab"])   # a word learnt later is found too
    assert "abcdefab" in vocabulary.two_edit_words("abcdfeba")


def test_fuzzy_alternatives():
    vocabulary = {"falcon", "falcons", "harbor", "fal"}
    assert fuzzy_alternatives("falcon", vocabulary) == ["falcon"]          # known: no expansion
    assert fuzzy_alternatives("falcom", vocabulary) == ["falcom", "falcon"]
    assert fuzzy_alternatives("fak", vocabulary) == ["fak"]                # too short to correct
    assert fuzzy_alternatives("2024", {"2023"}) == ["2024"]                # numbers are not typos
    counted = Vocabulary({"harbour": 1, "falcon": 1}, 2)
    assert fuzzy_alternatives("hervour", counted) == ["hervour", "harbour"]   # two edits, long word
    assert fuzzy_alternatives("fakcin", counted) == ["fakcin", "falcon"]
    assert fuzzy_alternatives("hrabuor", counted) == ["hrabuor"]              # both ends mistyped: not found
    assert fuzzy_alternatives("hervour", {"harbour"}) == ["hervour"]          # a plain set: one edit only


def test_hashed_embedder_is_deterministic_normalised_and_typo_tolerant(fresh_seed):
    rng = random.Random(fresh_seed)
    a, b = HashedNgramEmbedder(), HashedNgramEmbedder()
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(6, 10))) for _ in range(40)]
    texts = [" ".join(rng.sample(words, 4)) for _ in range(20)]
    va, vb = a.embed(texts), b.embed(texts)
    assert va.dtype == np.float32 and va.shape == (20, a.dim)
    np.testing.assert_array_equal(va, vb)             # a pure function of the text (no per-process hash seed)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)
    assert not a.embed([" ... "]).any()               # no features: a zero row, not NaN
    closer = 0
    for text in texts:
        word = text.split()[0]
        typo = word[:2] + word[3] + word[2] + word[4:]   # swap two letters
        query = a.embed([text.replace(word, typo), " ".join(rng.sample(words, 4))])
        target = a.embed([text])[0]
        closer += float(query[0] @ target) > float(query[1] @ target)
    assert closer == len(texts)
    assert a.name != HashedNgramEmbedder(dim=128).name
