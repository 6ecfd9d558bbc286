"""Incremental detokenization and stop strings: streamed pieces add up to the whole."""

from __future__ import annotations

import pytest
import torch
from helpers.toy import build_toy_tokenizer

from mamba_moe.inference.core.text import IncrementalDecoder, StopMatcher


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def stream(tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, prompt)
    return [decoder.push(t) for t in ids] + [decoder.flush()]


def test_multibyte_characters_are_emitted_whole(tokenizer):
    text = "Größe 東京 🙂 naïve — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_random_token_streams_decode_like_the_whole(tokenizer):
    n = len(tokenizer)
    for _ in range(30):
        ids = torch.randint(0, n, (int(torch.randint(1, 40, ())),)).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)
        # A text prompt ends on a character boundary, so its context changes nothing.
        prompt = tokenizer("Hi there, 東京!", add_special_tokens=False)["input_ids"]
        assert "".join(stream(tokenizer, ids, prompt)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_run_of_stray_bytes_streams_at_once_in_bounded_time(tokenizer):
    # The #6 server bug: a model that keeps emitting a UTF-8 continuation byte never completes a character.
    # The decoder used to hold the whole run back, so a 4000-token stream sent nothing until it ended.
    stray = next(t for t in range(len(tokenizer)) if tokenizer.decode([t] * 4) == "\ufffd" * 4)
    decoder = IncrementalDecoder(tokenizer, tokenizer("A story:", add_special_tokens=False)["input_ids"])
    pieces = []
    for _ in range(300):
        pieces.append(decoder.push(stray))
        assert len(decoder.ids) - decoder.prefix_offset <= 20, "the decode window keeps growing"
    pieces.append(decoder.flush())
    assert pieces[0] == "" and all(p == "\ufffd" for p in pieces[1:-1])   # one step behind, never stalled
    assert "".join(pieces) == "\ufffd" * 300


def test_long_random_streams_with_stray_bytes_decode_like_the_whole(tokenizer):
    # Mix valid multi-byte text with random (often undecodable) tokens, long enough to move the window.
    valid = tokenizer("Größe 東京 🙂 naïve", add_special_tokens=False)["input_ids"]
    for _ in range(10):
        ids: list[int] = []
        while len(ids) < 150:
            ids += valid if torch.rand(()) < 0.3 else torch.randint(0, len(tokenizer), (12,)).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_split_across_deltas_is_cut_and_never_emitted():
    matcher = StopMatcher(("o w",))
    out = [matcher.add(d) for d in ["Hel", "lo ", "wor", "ld"]]
    assert out == ["Hel", "l", "", ""]
    assert matcher.stopped and matcher.text == "Hell"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(("b", "cd"))
    assert matcher.add("xxcdxb") == "xx" and matcher.stopped


def test_held_back_tail_is_released_at_the_end():
    matcher = StopMatcher(("bc",))
    assert matcher.add("ab") == "a"
    assert matcher.finish() == "b"
    assert not matcher.stopped


def test_stop_at_the_very_start_gives_empty_text():
    matcher = StopMatcher(("###",))
    assert matcher.add("#") == "" and matcher.add("##tail") == "" and matcher.stopped and matcher.text == ""


def cut_at_first_completed_stop(text: str, stops: tuple[str, ...], ends: list[int]) -> str:
    """The rule, stated directly: after each piece (ending at ``ends``), if the text so far contains a
    stop string, cut where the earliest such occurrence starts."""
    for end in ends:
        hits = [text[:end].find(s) for s in stops if s in text[:end]]
        if hits:
            return text[:min(hits)]
    return text


def test_streamed_pieces_follow_the_stop_rule():
    alphabet = list("abc ")
    for _ in range(300):
        text = "".join(alphabet[i] for i in torch.randint(0, 4, (int(torch.randint(1, 30, ())),)))
        stops = tuple({"".join(alphabet[i] for i in torch.randint(0, 4, (int(torch.randint(1, 4, ())),)))
                       for _ in range(2)})
        cuts = sorted(set(torch.randint(0, len(text) + 1, (4,)).tolist()) | {0, len(text)})
        matcher = StopMatcher(stops)
        out = "".join(matcher.add(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
        if not matcher.stopped:
            out += matcher.finish()
        assert out == cut_at_first_completed_stop(text, stops, cuts[1:]), (text, stops, cuts)
        if len(cuts) == 2:                                   # one piece: the plain "cut at the first stop"
            hits = [text.find(s) for s in stops if s in text]
            assert out == (text[:min(hits)] if hits else text)
