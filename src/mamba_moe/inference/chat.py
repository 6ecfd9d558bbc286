"""Chat messages as the OpenAI API and the terminal chat give them: validated, text checked, ready to encode.

Encoding is not done here: ``core/prompt.py`` hands these messages to the data package's piecewise chat
encoder (``data/chat.py:encode_chat_prompt``, the one layout of the one ChatML in ``data/chatml.py``), which
inserts the markers as ids and encodes every content with special tokens *not* recognised, as training
does. So a message that spells ``<|im_end|>`` or ``<|im_start|>`` stays text and cannot close its turn or
open another. The tokenizer's own ``chat_template`` is not consulted: rendering a template to a string and
tokenizing that string is what let content forge markers.
"""

from __future__ import annotations

from typing import Any

from ..user_text import check_text

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, max_messages: int | None = None) -> list[dict[str, str]]:
    """Validate an OpenAI-style message list; ValueError naming the bad entry (``InvalidTextError`` for text
    that is not valid UTF-8). Content given as a list of text parts is joined."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {role, content} objects")
    if max_messages is not None and len(messages) > max_messages:
        raise ValueError(f"messages: {len(messages)} messages, more than the {max_messages} this server accepts")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: expected one of {list(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        clean.append({"role": role, "content": check_text(content, f"messages[{i}].content")})
    return clean
