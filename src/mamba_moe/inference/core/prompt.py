"""Prompts to token ids: plain text and chats, checked as user text, bounded before they are tokenized.

Three decisions live here:

- **Chat content never forges markers**: chats go through data's piecewise encoder
  (``data/chat.py:encode_chat_prompt``) with an ``encode`` that treats special-token strings as text. A
  plain completion prompt is the user's whole text (they could type any template themselves), so special
  tokens in it are recognised, as in vLLM and llama.cpp's server.
- **Tokenization releases the GIL**: ``Tokenizer.encode`` holds it for the whole text (a 1 MB prompt froze
  every other thread for 1.5 s), and so does data's ``DocumentEncoder`` in its regex split and its
  ``encode(..., is_pretokenized=True)`` (0.8 s for 1.2 MB of distinct words). ``encode_batch_fast`` releases
  it (and skips the offsets nobody reads, about 3x faster). The server tokenizes on a thread pool; this is
  what lets its event loop run meanwhile. Its ids are the tokenizer's own; ``DocumentEncoder``'s equal them
  except inside pre-tokens of over 4096 characters, which it cuts (no real chat has one).
- **A text that cannot fit is refused without tokenizing it**: with no normalizer, a token covers at most
  as many characters as its longest vocabulary string, so a text longer than ``max_tokens`` times that has
  more than ``max_tokens`` tokens. The bound is exact for byte-level BPE (one character per byte at most);
  tokenizers with a normalizer (which may delete characters) skip it.
"""

from __future__ import annotations

from typing import Any

from ...data.chat import encode_chat_prompt
from ...data.tokenizer import raw_copy, special_ids
from ...user_text import check_text
from ..chat import check_messages


class PromptTooLongError(ValueError):
    """A prompt with more tokens than allowed, found before or after tokenizing it."""

    def __init__(self, where: str, max_tokens: int, tokens: int | None = None, chars: int | None = None) -> None:
        if tokens is not None:
            message = f"the prompt is {tokens} tokens, longer than the {max_tokens} accepted"
        else:
            message = f"the prompt is {chars} characters, longer than {max_tokens} tokens (those accepted) can hold"
        super().__init__(f"{where}: {message}")
        self.where, self.max_tokens, self.tokens = where, max_tokens, tokens


class PromptEncoder:
    """Text and chats of one (fast) tokenizer to ids. Thread-safe: it encodes with private copies that are
    never mutated (HF tokenizers raise "Already borrowed" when padding settings change mid-encode)."""

    def __init__(self, tokenizer: Any) -> None:
        self.special = special_ids(tokenizer)
        self._plain = raw_copy(tokenizer, encode_special_tokens=False)
        self._content = raw_copy(tokenizer, encode_special_tokens=True)
        vocab = self._plain.get_vocab(with_added_tokens=True)
        self.max_chars_per_token = max(map(len, vocab)) if self._plain.normalizer is None and vocab else None

    def text(self, text: str, where: str = "prompt", max_tokens: int | None = None) -> list[int]:
        """Ids of a plain prompt (special tokens in it recognised); ``max_tokens`` bounds its length."""
        check_text(text, where)
        self._bound(len(text), where, max_tokens)
        return self._check(self._encode(self._plain, text), where, max_tokens)

    def chat(self, messages: Any, max_tokens: int | None = None, max_messages: int | None = None) -> list[int]:
        """Ids of a conversation in ChatML ending with the assistant's generation prompt (messages validated)."""
        clean = check_messages(messages, max_messages)
        self._bound(sum(len(m["content"]) for m in clean), "messages", max_tokens)
        ids = encode_chat_prompt(lambda text: self._encode(self._content, text), self.special, clean)
        return self._check(ids, "messages", max_tokens)

    def content(self, text: str) -> list[int]:
        """Ids of ``text`` as chat content (special-token strings stay text): the pieces a chat kept across
        turns appends between the template's markers (``memory/working.py``)."""
        return self._encode(self._content, check_text(text, "content"))

    @staticmethod
    def _encode(tokenizer: Any, text: str) -> list[int]:
        return tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def _bound(self, chars: int, where: str, max_tokens: int | None) -> None:
        if max_tokens is not None and self.max_chars_per_token and chars > max_tokens * self.max_chars_per_token:
            raise PromptTooLongError(where, max_tokens, chars=chars)

    @staticmethod
    def _check(ids: list[int], where: str, max_tokens: int | None) -> list[int]:
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLongError(where, max_tokens, tokens=len(ids))
        return ids
