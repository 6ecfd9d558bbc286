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


class IncrementalDecoder:
    """Turns one token at a time into text deltas, the way TGI and vLLM do.

    It decodes a short window of recent tokens twice (with and without the newest ones) and emits the
    difference, so each step costs O(window) rather than O(length). Text ending in U+FFFD (an
    incomplete multi-byte character) is held until the next token completes it, or until ``flush``.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""


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
