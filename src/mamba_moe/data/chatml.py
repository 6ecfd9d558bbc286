"""The project's chat convention, in one place: special tokens, their ids, and the ChatML template.

Everything that writes or reads a chat imports from here: the tokenizer trainer (which stores the
template and the tokens in every saved tokenizer), the training-side chat encoder (:mod:`.chat`), and
inference (prompts, stop tokens). ``CHAT_TEMPLATE`` is the Jinja text that ``apply_chat_template`` and
llama.cpp read from a saved tokenizer; :func:`render_chat_text` is the same rendering in Python, and
``tests/data/test_chat.py`` checks the two agree on arbitrary messages.

ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; the generation prompt opens an
assistant turn, ``<|im_start|>assistant\\n``, and the model ends its answer with ``<|im_end|>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PAD = "<|pad|>"
ENDOFTEXT = "<|endoftext|>"   # the document separator, and the tokenizer's EOS
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# The fixed ids of our own tokenizers (a teacher's tokenizer may differ: look ids up with
# ``tokenizer.special_ids``, which falls back to the tokenizer's own EOS/PAD).
PAD_ID, ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2, 3 in this order
SPECIAL_TOKEN_IDS = {PAD: PAD_ID, ENDOFTEXT: ENDOFTEXT_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}
# Tokens that end a generation: the end of a document, and the end of an assistant turn.
END_TOKENS = (ENDOFTEXT, IM_END)

GENERATION_PROMPT = f"{IM_START}assistant\n"

# The Jinja source saved in tokenizer_config.json. Written with '\\n' escapes inside Jinja string
# literals (Jinja turns them into newlines), so the saved JSON holds one readable line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML string of ``messages``: exactly what ``CHAT_TEMPLATE`` renders.

    This is text for display and comparison. To get ids, never tokenize this string with special tokens
    recognised (content could then forge turn markers): use :mod:`mamba_moe.data.chat`, which inserts the
    markers as ids and encodes the content as text.
    """
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")
