"""One policy for text that comes from users: files, HTTP bodies, argv and stdin.

Tokenizers (HF ``tokenizers``, Rust) cannot take a Python ``str`` holding a lone surrogate (``"\\ud800"``),
and bytes that are not UTF-8 have no text at all. Such input arrives in several ways: JSON escapes
(``"\\ud800"`` is valid JSON), Python's ``surrogateescape`` decoding of argv and stdin, files in another
encoding. Every entry point checks its text here, so the decision is made once: the text is refused with
an error that says where it came from and where in it the bad character is. Callers then decide what
refusing means for them: a data pipeline counts and skips the record, a server answers 400, a CLI prints
the error and keeps its session.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidTextError(ValueError):
    """Text that no tokenizer can take: a lone surrogate, or bytes that are not UTF-8."""


def check_text(text: str, where: str) -> str:
    """``text`` unchanged if it is encodable as UTF-8; else :class:`InvalidTextError` naming ``where``.

    ``where`` names the source for the message: ``"file.jsonl:12"``, ``"messages[0].content"``, ``"prompt"``.
    """
    if not isinstance(text, str):
        raise InvalidTextError(f"{where}: expected text, got {type(text).__name__}")
    if text.isascii():
        return text
    bad = _SURROGATE.search(text)
    if bad is not None:
        code = ord(bad.group())
        what = (f"an undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate U+{code:04X}")
        raise InvalidTextError(f"{where}: {what} at character {bad.start()}; text must be valid UTF-8")
    return text


def decode_text(data: bytes, where: str) -> str:
    """Strict UTF-8 decoding of ``data``; :class:`InvalidTextError` naming ``where`` and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidTextError(f"{where}: invalid UTF-8 at byte {exc.start} "
                               f"(0x{data[exc.start]:02x}); text must be valid UTF-8") from None
