"""From token ids to streamed text: incremental detokenization and stop-string matching.

Both are written so that concatenating every streamed delta gives exactly the text a non-streaming
call returns: the decoder only emits text once it is complete (no half UTF-8 characters), and the stop
matcher holds back any tail that could still turn into a stop string.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded along with the first generated ones, so tokenizers whose pieces depend on
# their left neighbour (SentencePiece's leading spaces) decode the first token as they would in context.
_CONTEXT_TOKENS = 5
# Held tokens after which the window is moved forward (a UTF-8 character spans at most 4 byte tokens).
_MAX_HELD = 8


class IncrementalDecoder:
    """Turns one token at a time into text deltas, the way TGI and vLLM do.

    It decodes a short window of recent tokens twice (with and without the newest ones) and emits the
    difference, so each step costs O(window) rather than O(length). Text ending in U+FFFD (an
    incomplete multi-byte character) is held until the next token completes it, or until ``flush``.

    Only that last U+FFFD is held, not the text before it: lossy UTF-8 decoding replaces each invalid
    byte run for good, and only a trailing valid-but-incomplete sequence can still become a character.
    (Holding the whole window instead stalled a stream for its whole length when a model kept emitting
    stray continuation bytes, which random toy weights do.) Such a run also moves the window forward at
    a clean split, so its cost per token stays bounded.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.sent = 0  # characters past the window's prefix already emitted while the tail was held

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        new = text[len(prefix):] if len(text) > len(prefix) else ""
        if new and not new.endswith("\ufffd"):
            out = new[self.sent:]
            self.prefix_offset, self.read_offset, self.sent = self.read_offset, len(self.ids), 0
            return out
        out = new[self.sent:-1]  # all but a possibly incomplete last character
        self.sent = max(self.sent, len(new) - 1)
        if len(self.ids) - self.read_offset > _MAX_HELD:
            self._rebase(len(prefix), text)
        return out

    def _rebase(self, prefix_len: int, text: str) -> None:
        """Start the window later, at a token boundary ``j`` where decoding splits cleanly (the text up to
        ``j`` plus the text from ``j`` equals the whole, so no character spans ``j``) and whose left part
        has been emitted. The last 4 tokens stay in the window: they may hold an incomplete character."""
        for j in range(len(self.ids) - 4, len(self.ids) - 8, -1):
            left = self._decode(self.ids[self.prefix_offset:j])
            start = max(self.prefix_offset, j - _CONTEXT_TOKENS)
            context, right = self._decode(self.ids[start:j]), self._decode(self.ids[start:])
            if (len(left) - prefix_len <= self.sent and right.startswith(context)
                    and left + right[len(context):] == text):
                self.sent -= len(left) - prefix_len
                self.prefix_offset, self.read_offset = start, j
                return

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        out = text[len(prefix) + self.sent:] if len(text) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.sent = 0
        return out


class StopMatcher:
    """Accumulates text, cuts it at the first stop string, and says how much is safe to emit.

    The rule: generation stops as soon as the text contains a stop string, and the text is cut where the
    earliest occurrence in it starts (when stop strings overlap, one that completes first wins over one
    that would have started earlier but is not complete yet). A stop string is never part of the output:
    while the text ends with a proper prefix of some stop string, that tail is held back.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, delta: str) -> str:
        """Add decoded text; return the part that can be emitted now. Sets ``stopped`` on a match."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held())

    def _held(self) -> int:
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out

    def finish(self) -> str:
        """The held-back tail, released when generation ends for another reason."""
        return self._emit(len(self.text))
