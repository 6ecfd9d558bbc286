"""ChatML rendering to ids with a loss mask on the assistant's tokens.

A chat is encoded piece by piece: ``<|im_start|>`` + ``{role}\\n`` + content + ``<|im_end|>`` + ``\\n``,
with the markers inserted as ids and the text encoded with special tokens off. This matches the
tokenizer's chat template token for token except where a content starts with a newline (the template,
tokenized as one string, would merge it with the header's newline). Piecewise is the right choice for
training: at inference the prompt ends with the header ``<|im_start|>assistant\\n`` and the model
generates the content from there, which is exactly the piecewise boundary. A literal ``<|im_end|>``
inside a message stays text, so content cannot end a turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .tokenizer import SpecialIds, TokenizerError

Encode = Callable[[str], list[int]]


def render_chat_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML string of ``messages`` (what the saved tokenizer's chat template produces)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode_chat(encode: Encode, special: SpecialIds, messages: Sequence[dict[str, str]],
                train_roles: Sequence[str] = ("assistant",)) -> tuple[list[int], list[int]]:
    """Ids of a chat and a same-length 0/1 mask, 1 exactly on the content and ``<|im_end|>`` of turns
    whose role is in ``train_roles`` (the header and the newline after ``<|im_end|>`` stay 0: the
    prompt supplies the header, and generation stops at ``<|im_end|>``).
    """
    if special.im_start is None or special.im_end is None:
        raise TokenizerError("tokenizer: has no <|im_start|>/<|im_end|> tokens, so it cannot encode chats")
    newline = encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header = [special.im_start, *encode(f"{message['role']}\n")]
        body = [*encode(message["content"]), special.im_end]
        train = 1 if message["role"] in train_roles else 0
        ids += header + body + newline
        mask += [0] * len(header) + [train] * len(body) + [0] * len(newline)
    return ids, mask
