r"""Bulk document encoding: the tokenizer's exact ids, two to four times faster than ``tokenizers``.

Measured on the stdlib corpus, most of ``tokenizers``' time goes into its Oniguruma pre-tokenizer and
per-piece bookkeeping (~1.7 MB/s per core). For byte-level BPE the ids of a document are the
concatenation of the ids of its pre-tokens, each encoded alone. So :class:`DocumentEncoder` splits with
Python's regex engines (``re`` with the classes spelled out for ASCII-only documents, the ``regex``
module with the very same pattern otherwise), looks each pre-token up in a cache, and asks the real
tokenizer only for pre-tokens it has not seen yet. Tests compare the paths on real code and on random
Unicode.

**When a document leaves the fast path.** The engines can only disagree where their Unicode tables do.
``regex`` follows a newer Unicode than the Oniguruma inside ``tokenizers``, so code points assigned in
between are ``\p{L}``/``\p{N}`` for one engine and not the other (measured with regex 2026.x and tokenizers
0.23: 17,144 letters and 336 digits, every one unassigned in Python 3.11's own tables; no other class and
no assigned character differs). Every character is checked once against both; a document containing one
on which they disagree takes the "slow" path (counted in ``slow_docs``): the stretches of it (~64k
characters, cut after a newline) that hold such a character are split by Oniguruma, the rest as usual.
Whether a document goes slow thus depends only on its characters: U+0558 sends one there, while no file of
the 3.11 standard library contains such a character. The fallback is correct, not a bug: those characters
genuinely split differently.

**Bounded memory per pre-token.** BPE costs about 200 bytes of memory per character of the pre-token it
merges (``tokenizers`` keeps a symbol list and a merge queue): a 16 MB run of letters, spaces or ``=`` is
one pre-token, and took 3.4 GB in ``data prepare``. Pre-tokens longer than :data:`MAX_PRETOKEN_CHARS`
are therefore cut into pieces of that many characters before BPE, on both paths, and pieces are encoded
in batches of bounded size. The ids still decode to the exact text; they differ from ``tokenizers`` (and
from llama.cpp, whose llama-bpe split has no such limit) only inside such pre-tokens, where a token
would have spanned a cut. No pre-token of real text is that long (the longest in the 3.11 standard
library, tests included, has 201 characters).

**The cache** holds at most ``_MAX_CACHE`` pre-tokens of up to ``_MAX_CACHED_WORD`` characters and is
emptied when full. Encoding a document looks its words up in a table built for that document, so a
refill in the middle of it cannot lose words (it once raised ``KeyError`` after two million pre-tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from itertools import chain, islice
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from .tokenizer import (
    GPT2_SPLIT_REGEX,
    LLAMA3_SPLIT_REGEX,
    MAX_PRETOKEN_CHARS,
    backend,
    llama_cpp_pre_name,
    raw_copy,
)

_PATTERNS = {"llama-bpe": LLAMA3_SPLIT_REGEX, "gpt2": GPT2_SPLIT_REGEX}
# The same patterns for ASCII-only text, with \p{L} = [A-Za-z], \p{N} = [0-9], \s = [\t\n\v\f\r ] spelled out,
# for Python's faster ``re`` (about twice ``regex`` here). Used only if tokenizers agrees on those classes.
_WS = r"\t\n\v\f\r "
_ASCII_PATTERNS = {
    "llama-bpe": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}"
                  rf"| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
    "gpt2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+"
             rf"| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
}
_ASCII_CLASSES = {
    r"\p{L}": {chr(c) for c in range(128) if chr(c).isalpha()},
    r"\p{N}": {chr(c) for c in range(128) if chr(c).isdigit()},
    r"\s": set("\t\n\v\f\r "),
}
# The character classes the split patterns consult; a character is "safe" when both engines agree on all.
_CLASSES = (r"\p{L}", r"\p{N}", r"\s")
# MAX_PRETOKEN_CHARS (from tokenizer.py, shared with training): the longest pre-token given to BPE whole
# (see the module doc), ~0.8 MB of BPE memory at most, far above any token's length.
_MAX_CACHE = 2_000_000            # cached pre-tokens
_MAX_CACHED_WORD = 256            # longer pre-tokens (or pieces) are encoded per document, not cached
_LEARN_BATCH_CHARS = 1 << 20      # characters encoded by one call of the word tokenizer
_SEGMENT_CHARS = 1 << 16          # slow path: text split by one engine at a time (see _segments)
_BOUNDARY = re.compile(r"\n(?=[!-~])")


class DocumentEncoder:
    """Encode documents to ids, specials as plain text, exactly as ``tokenizer.backend_tokenizer`` would.

    Built from a tokenizer or its ``to_str()`` JSON (so worker processes can rebuild it cheaply). Falls
    back to ``tokenizers`` entirely when the tokenizer is not a plain byte-level BPE with a known split.
    """

    def __init__(self, tokenizer: Any) -> None:
        # One private copy of the (large) vocabulary; the reference copy is made only if a document needs it.
        self._source = tokenizer if isinstance(tokenizer, str) else backend(tokenizer).to_str()
        tok = Tokenizer.from_str(self._source)
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True
        self._reference: Tokenizer | None = None
        self.fast_docs = 0
        self.slow_docs = 0
        self.whole_splits = 0  # slow documents whose segmenting failed its own check (tests expect none)
        self._pattern = None
        self._ascii_pattern = None
        name = llama_cpp_pre_name(tok)
        plain = (tok.normalizer is None and isinstance(tok.model, models.BPE)
                 and all(t.special for t in tok.get_added_tokens_decoder().values()))  # non-special ones split text
        if name in _PATTERNS and plain:
            import regex

            self._pattern = regex.compile(_PATTERNS[name])
            self._regex = regex
            ascii_chars = [chr(c) for c in range(128)]
            if all(set(ascii_chars) - _kept_by_onig(cls, ascii_chars) == members
                   for cls, members in _ASCII_CLASSES.items()):
                self._ascii_pattern = re.compile(_ASCII_PATTERNS[name])
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            self._words = tok  # encodes one pre-token at a time
            self._cache: dict[str, list[int]] = {}
            self._safe: set[str] = set()
            self._unsafe: set[str] = set()
            self._check_chars({chr(c) for c in range(128)})
            self._ascii_safe = not any(ord(c) < 128 for c in self._unsafe)
            if not self._ascii_safe:
                self._ascii_pattern = None
            # The slow path: tokenizers' own engine splits, the pieces then go through the same word cache.
            self._onig_split = pre_tokenizers.Split(Regex(_PATTERNS[name]), behavior="isolated", invert=False)
        else:
            self._reference = tok

    @property
    def reference(self) -> Tokenizer:
        """The tokenizer itself (specials as text): the slow path, and what the fast path must equal."""
        if self._reference is None:
            self._reference = raw_copy(Tokenizer.from_str(self._source), encode_special_tokens=True)
        return self._reference

    @property
    def is_fast(self) -> bool:
        """Whether the cached split path is available for this tokenizer."""
        return self._pattern is not None

    # ---- character agreement between the two regex engines ------------------------------------------
    def _check_chars(self, chars: set[str]) -> None:
        """Classify ``chars`` under both engines; those with any disagreement go to ``_unsafe``."""
        chars = {c for c in chars if c not in self._safe and c not in self._unsafe}
        if not chars:
            return
        ordered = sorted(chars)
        bad: set[str] = set()
        for cls in _CLASSES:
            onig = chars - _kept_by_onig(cls, ordered)
            ours = set(self._regex.findall(cls, "".join(ordered)))
            bad |= onig ^ ours
        self._unsafe |= bad
        self._safe |= chars - bad

    def _fast_ok(self, text: str) -> bool:
        if text.isascii() and self._ascii_safe:
            return True
        chars = set(text)
        new = chars - self._safe
        if not new:
            return True
        self._check_chars(new)
        return not (chars & self._unsafe)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of one document (nothing added: no BOS, no separator)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each document, in order."""
        if self._pattern is None:
            self.slow_docs += len(texts)
            return [e.ids for e in self.reference.encode_batch_fast(texts)]
        out: list[list[int]] = []
        for text in texts:
            if self._ascii_pattern is not None and text.isascii():
                words = self._ascii_pattern.findall(text)
                self.fast_docs += 1
            elif self._fast_ok(text):
                words = self._pattern.findall(text)
                self.fast_docs += 1
            else:
                words = self._split_slow(text)
                self.slow_docs += 1
            out.append(self._encode_words(words))
        return out

    def _split_slow(self, text: str) -> list[str]:
        """Pre-tokens of a document holding a character the engines disagree on.

        Only the segments (:func:`_segments`) holding such a character are split by Oniguruma; the others
        by the fast engine, which agrees with it on their characters. So a large document with one rare
        character costs little more than a fast one (Oniguruma's split takes ~100 bytes per character).
        """
        if not self._ascii_safe:  # the cut rule relies on the engines agreeing on ASCII
            return [piece for piece, _ in self._onig_split.pre_tokenize_str(text)]
        words: list[str] = []
        for start, end in _segments(text, _SEGMENT_CHARS):
            # One character past the boundary as context (it is a piece on its own, dropped below), so the
            # segment's last match sees what follows it just as in the whole text.
            segment = text[start:end + 1]
            if set(segment) & self._unsafe:
                pieces = [piece for piece, _ in self._onig_split.pre_tokenize_str(segment)]
            elif self._ascii_pattern is not None and segment.isascii():
                pieces = self._ascii_pattern.findall(segment)
            else:
                pieces = self._pattern.findall(segment)
            if end < len(text):
                if not pieces or pieces[-1] != text[end]:  # cannot happen (see _segments); stay exact if it does
                    self.whole_splits += 1
                    return [piece for piece, _ in self._onig_split.pre_tokenize_str(text)]
                pieces.pop()
            words += pieces
        return words

    def _encode_words(self, words: list[str]) -> list[int]:
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, words)))
        except KeyError:
            pass
        missing = list(set(words).difference(self._cache))  # iterates the few unique words, not the cache
        # No cached word is long (_MAX_CACHED_WORD < MAX_PRETOKEN_CHARS), so every long pre-token is here:
        # checking these few words, off the all-cached path, costs nothing measurable.
        if max(map(len, missing)) > MAX_PRETOKEN_CHARS:
            words = _cut_long(words)
            missing = list(set(words).difference(self._cache))
        return list(chain.from_iterable(map(self._learn(words, missing), words)))

    def _learn(self, words: list[str], missing: list[str]) -> Callable[[str], list[int]]:
        """Encode ``missing`` (the words of ``words`` not cached) with the word tokenizer, each alone as BPE
        does, cache them, and return the lookup that resolves every word of ``words``.

        The lookup is the cache itself, unless some word could not stay in it: too long to cache, or the
        cache was refilled (it drops words this document needs), in which case a table of the document's
        own words answers.
        """
        new: dict[str, list[int]] = {}
        if sum(map(len, missing)) <= _LEARN_BATCH_CHARS:
            new = self._encode_pretokenized(missing)
        else:  # batches of bounded size: a long document's pieces never build one giant call
            batch: list[str] = []
            size = 0
            for word in missing:
                if batch and size + len(word) > _LEARN_BATCH_CHARS:
                    new.update(self._encode_pretokenized(batch))
                    batch, size = [], 0
                batch.append(word)
                size += len(word)
            new.update(self._encode_pretokenized(batch))
        all_cacheable = max(map(len, missing), default=0) <= _MAX_CACHED_WORD
        fresh = new if all_cacheable else {w: ids for w, ids in new.items() if len(w) <= _MAX_CACHED_WORD}
        if len(self._cache) + len(fresh) > _MAX_CACHE:
            table = {w: self._cache[w] for w in set(words) if w in self._cache}
            table.update(new)
            self._cache.clear()
            self._cache.update(islice(fresh.items(), _MAX_CACHE))
            return table.__getitem__
        self._cache.update(fresh)
        if all_cacheable:
            return self._cache.__getitem__
        cache = self._cache
        return lambda w: new[w] if w in new else cache[w]

    def _encode_pretokenized(self, words: list[str]) -> dict[str, list[int]]:
        # one pre-tokenized sequence is ~2.5x cheaper than a batch of one-word inputs; word_ids regroup it
        enc = self._words.encode(words, is_pretokenized=True)
        ids = enc.ids
        ends = np.cumsum(np.bincount(np.asarray(enc.word_ids, dtype=np.int64), minlength=len(words))).tolist()
        return dict(zip(words, (ids[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)), strict=True))


def _segments(text: str, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` spans covering ``text``, about ``size`` characters each, cut at pre-token boundaries.

    A cut goes after a newline that is followed by a printable non-space ASCII character. Both split
    patterns end every match holding that newline right there: only whitespace alternatives match a
    newline, and they cannot reach past a non-space character. Both engines agree on ASCII (checked when
    the encoder is built). Matching a segment plus that one following character therefore yields the
    whole text's pre-tokens for the segment, then that character alone.
    """
    start = 0
    while len(text) - start > size:
        cut = _BOUNDARY.search(text, start + size - 1)
        if cut is None:
            break
        yield start, cut.start() + 1
        start = cut.start() + 1
    yield start, len(text)


def _cut_long(words: list[str]) -> list[str]:
    """``words`` with every word longer than :data:`MAX_PRETOKEN_CHARS` cut into pieces of that length."""
    out: list[str] = []
    for word in words:
        if len(word) <= MAX_PRETOKEN_CHARS:
            out.append(word)
        else:
            out += [word[i:i + MAX_PRETOKEN_CHARS] for i in range(0, len(word), MAX_PRETOKEN_CHARS)]
    return out


def _kept_by_onig(cls: str, chars: list[str]) -> set[str]:
    """The characters of ``chars`` that tokenizers' regex engine does NOT put in class ``cls``."""
    sep = "a" if cls == r"\s" else " "  # a separator outside the class being probed
    split = pre_tokenizers.Split(Regex(cls), behavior="removed")
    return set("".join(piece for piece, _ in split.pre_tokenize_str(sep.join(chars))))
