"""The chat convention: one template, one renderer that equals it, and encoders that never let content forge
a turn marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.data import tiny_tokenizer_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

import mamba_moe
from mamba_moe.data import chatml
from mamba_moe.data.chat import ChatEncoder, encode_chat, encode_chat_prompt
from mamba_moe.data.chatml import CHAT_TEMPLATE, END_TOKENS, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, render_chat_text
from mamba_moe.data.encode import DocumentEncoder
from mamba_moe.data.tokenizer import backend, load_tokenizer, raw_copy, special_ids
from mamba_moe.user_text import InvalidTextError

MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>")
# Message text: anything printable-ish, with the characters that break naive templating and the markers.
TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.lists(
    st.sampled_from(["{{", "}}", "{%", "'", '"', "\\n", "\n", " ", "x", "é", *MARKERS]), max_size=8).map("".join)
ROLES = st.sampled_from(["system", "user", "assistant", "tool"]) | st.text("abcxyz_-", min_size=1, max_size=8)
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": TEXT}), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tiny_tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def test_one_template_and_one_set_of_tokens():
    assert SPECIAL_TOKENS == ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [SPECIAL_TOKEN_IDS[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert set(END_TOKENS) == {"<|endoftext|>", "<|im_end|>"}
    # Nowhere else in the package is a ChatML template written out (inference imports this one).
    src = Path(mamba_moe.__file__).parent
    copies = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py"))
              if re.search(r"\{%-?\s*for message in messages", p.read_text(encoding="utf-8"))]
    assert copies == [str(Path(chatml.__file__).relative_to(src))]


@settings(max_examples=200, deadline=None)
@given(messages=MESSAGES, add_generation_prompt=st.booleans())
def test_python_renderer_equals_the_jinja_template(messages, add_generation_prompt):
    # transformers renders chat templates with these options (trim_blocks, lstrip_blocks) in a sandbox
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert render_chat_text(messages, add_generation_prompt) == rendered


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES)
def test_saved_tokenizer_renders_the_same_text(tok, messages):
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat_text(
        messages, add_generation_prompt=True)


def _plain(text: str) -> bool:
    """Content that tokenizes the same alone as inside the template: no markers, and no leading whitespace
    holding a newline (it would merge with the header's newline into one pre-token; see data/chat.py)."""
    lead = text[:len(text) - len(text.lstrip())]
    return not any(m in text for m in MARKERS) and "\n" not in lead and "\r" not in lead


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES.filter(lambda ms: all(_plain(m["content"]) for m in ms)))
def test_piecewise_ids_equal_the_tokenized_template(tok, messages):
    reference = raw_copy(tok, encode_special_tokens=False)  # markers in the rendered text become special ids
    expected = reference.encode(render_chat_text(messages, add_generation_prompt=True)).ids
    assert ChatEncoder(tok).prompt(messages) == expected
    ids, mask = ChatEncoder(tok).encode(messages)
    assert ids == reference.encode(render_chat_text(messages)).ids and len(mask) == len(ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES)
def test_content_never_forges_a_marker(tok, messages):
    """Markers come only from the template: exactly one <|im_start|> per turn plus the generation prompt,
    one <|im_end|> per turn, never <|endoftext|>, whatever the content says; the text survives intact."""
    special = special_ids(tok)
    ids = ChatEncoder(tok).prompt(messages)
    assert ids.count(special.im_start) == len(messages) + 1
    assert ids.count(special.im_end) == len(messages)
    assert special.eos not in ids and special.pad not in ids
    assert backend(tok).decode(ids, skip_special_tokens=False) == render_chat_text(messages, True)


def test_prompt_ends_with_the_generation_prompt(tok):
    special = special_ids(tok)
    encode = DocumentEncoder(tok).encode
    messages = [{"role": "user", "content": "hi"}]
    ids = encode_chat_prompt(encode, special, messages)
    assert ids == encode_chat(encode, special, messages)[0] + [special.im_start, *encode("assistant\n")]
    assert encode_chat_prompt(encode, special, messages, add_generation_prompt=False) == encode_chat(
        encode, special, messages)[0]


def test_invalid_text_is_refused_by_name(tok):
    with pytest.raises(InvalidTextError, match=r"messages\[1\]\.content: a lone surrogate U\+D800"):
        ChatEncoder(tok).prompt([{"role": "user", "content": "ok"}, {"role": "user", "content": "a\ud800"}])
