"""GSM8K scoring: find the final number of an answer and compare it, after normalisation, to the reference.

Extraction, in order: the number after the first ``####`` (the dataset's own answer convention, which the
few-shot exemplars teach); else the number after the last "answer is" / "answer:"; else the last number
in the text. Normalisation: thousands commas, ``$``, ``%``, a leading ``+`` and surrounding spaces go;
the value is compared as an exact decimal, so ``18``, ``18.0``, ``18.00``, ``$18`` and ``18.`` agree while
``18.5`` does not. Only ``1,234`` (groups of three) is read as a thousands separator: ``1,2,3`` is a list.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional sign and $, digits with proper thousands groups or plain, an optional decimal part.
_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\$?\s?\.\d+"
NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
HASH_RE = re.compile(rf"####\s*(?:\*\*)?\s*({_NUMBER})")
ANSWER_IS_RE = re.compile(rf"answer(?:\s+is)?\s*[:=]?\s*(?:\*\*)?\s*({_NUMBER})", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """The canonical string of a number as written (``"$1,234.50"`` -> ``"1234.5"``), or None if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    cleaned = cleaned.rstrip(".")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    if not cleaned or not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    text_value = format(value.normalize(), "f")
    return text_value


def reference_answer(answer: str) -> str:
    """The normalised number of a GSM8K reference answer (its ``#### n`` line); an error if it has none."""
    match = HASH_RE.search(answer)
    if not match or normalize_number(match.group(1)) is None:
        raise ValueError(f"GSM8K reference answer without a '#### <number>' line: {answer[-80:]!r}")
    return normalize_number(match.group(1))  # type: ignore[return-value]


def extract_answer(output: str) -> tuple[str | None, str]:
    """(normalised final number or None, how it was found: "####", "answer is", "last number" or "none")."""
    if not output:
        return None, "none"
    match = HASH_RE.search(output)
    if match and (value := normalize_number(match.group(1))) is not None:
        return value, "####"
    matches = list(ANSWER_IS_RE.finditer(output))
    if matches and (value := normalize_number(matches[-1].group(1))) is not None:
        return value, "answer is"
    for found in reversed(list(NUMBER_RE.finditer(output))):
        value = normalize_number(found.group(0))
        if value is not None:
            return value, "last number"
    return None, "none"


def is_correct(output: str, reference: str) -> bool:
    value, _ = extract_answer(output)
    return value is not None and value == normalize_number(reference)
