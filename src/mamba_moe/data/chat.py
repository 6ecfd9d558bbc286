"""Chats to ids: the turn markers inserted as ids, the text encoded as text, with a loss mask.

A chat is encoded piece by piece: ``<|im_start|>`` + ``{role}\\n`` + content + ``<|im_end|>`` + ``\\n``,
with the markers inserted as ids and the text encoded with special tokens off. So a literal
``<|im_end|>`` or ``<|im_start|>`` inside a message stays text: content cannot end a turn or open one,
in training and at inference alike (:class:`ChatEncoder` is the entry point for both).

This matches tokenizing the rendered template (:func:`render_chat_text`) token for token, except where a
message's content begins with whitespace that holds a newline: tokenized as one string, the template's
``\\n`` after the role would merge with it into one pre-token. Piecewise is the right choice anyway: at
inference the prompt ends with the header ``<|im_start|>assistant\\n`` and the model generates the
content from there, which is exactly the piecewise boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..user_text import check_text
from .chatml import render_chat_text  # noqa: F401  (re-exported: the renderer lives with the template)
from .encode import DocumentEncoder
from .tokenizer import SpecialIds, TokenizerError, special_ids

Encode = Callable[[str], list[int]]


def _require_markers(special: SpecialIds) -> tuple[int, int]:
    if special.im_start is None or special.im_end is None:
        raise TokenizerError("tokenizer: has no <|im_start|>/<|im_end|> tokens, so it cannot encode chats")
    return special.im_start, special.im_end


def answer_turn(encode: Encode, special: SpecialIds, content: str) -> list[int]:
    """Ids of one turn's body as the model writes it: the content (special-token strings as text), then
    ``<|im_end|>``: what SFT trains an assistant turn on, and what scoring an answer scores."""
    _, im_end = _require_markers(special)
    return [*encode(content), im_end]


def encode_chat(encode: Encode, special: SpecialIds, messages: Sequence[Mapping[str, str]],
                train_roles: Sequence[str] = ("assistant",)) -> tuple[list[int], list[int]]:
    """Ids of a chat and a same-length 0/1 mask, 1 exactly on the content and ``<|im_end|>`` of turns
    whose role is in ``train_roles`` (the header and the newline after ``<|im_end|>`` stay 0: the
    prompt supplies the header, and generation stops at ``<|im_end|>``).

    ``encode`` must encode special-token strings as text (``DocumentEncoder.encode`` does).
    """
    im_start, im_end = _require_markers(special)
    newline = encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header = [im_start, *encode(f"{message['role']}\n")]
        body = answer_turn(encode, special, message["content"])
        train = 1 if message["role"] in train_roles else 0
        ids += header + body + newline
        mask += [0] * len(header) + [train] * len(body) + [0] * len(newline)
    return ids, mask


def encode_chat_prompt(encode: Encode, special: SpecialIds, messages: Sequence[Mapping[str, str]],
                       add_generation_prompt: bool = True) -> list[int]:
    """Ids of a prompt: the chat's turns and (by default) the opened assistant turn to generate into."""
    im_start, _ = _require_markers(special)
    ids, _ = encode_chat(encode, special, messages, train_roles=())
    if add_generation_prompt:
        ids += [im_start, *encode("assistant\n")]
    return ids


class ChatEncoder:
    """Chats to ids for one tokenizer, the template's markers as ids and every message text as text.

    ``prompt`` is what inference feeds the model; ``encode`` (ids and loss mask) what SFT trains on. Text
    is checked first (:func:`mamba_moe.user_text.check_text`): a lone surrogate raises
    :class:`~mamba_moe.user_text.InvalidTextError` naming ``messages[i].content``, which a server answers
    with a 400 and a data pipeline counts as a skip.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.special = special_ids(tokenizer)
        _require_markers(self.special)
        self._encoder = DocumentEncoder(tokenizer)

    def _checked(self, messages: Sequence[Mapping[str, str]]) -> Sequence[Mapping[str, str]]:
        for i, message in enumerate(messages):
            check_text(message["role"], f"messages[{i}].role")
            check_text(message["content"], f"messages[{i}].content")
        return messages

    def encode(self, messages: Sequence[Mapping[str, str]],
               train_roles: Sequence[str] = ("assistant",)) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole chat; see :func:`encode_chat`."""
        return encode_chat(self._encoder.encode, self.special, self._checked(messages), train_roles)

    def prompt(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of ``messages``, ending with ``<|im_start|>assistant\\n`` unless told otherwise."""
        return encode_chat_prompt(self._encoder.encode, self.special, self._checked(messages),
                                  add_generation_prompt)
