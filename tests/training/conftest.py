"""Fixtures of the distillation tests (teacher and sequence-level): a tiny tokenizer and a tiny teacher, built once
per module from tests/helpers/distill.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.distill import make_tiny_teacher, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_teacher(tmp_path_factory.getbasetemp(), tokenizer)
