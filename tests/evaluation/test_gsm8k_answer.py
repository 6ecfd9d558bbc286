"""GSM8K extraction and normalisation: right, wrong, malformed, empty and adversarial answers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mamba_moe.evaluation.data import data_file, read_jsonl
from mamba_moe.evaluation.errors import EvalError
from mamba_moe.evaluation.tasks.gsm8k_answer import extract_answer, is_correct, normalize_number, reference_answer


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.0", "18"), ("18.00", "18"), ("$18", "18"), ("18.", "18"), ("1,234", "1234"),
    ("$1,234.50", "1234.5"), ("-5", "-5"), ("+7", "7"), ("0.50", "0.5"), (".5", "0.5"), ("-0", "0"),
    ("0.0", "0"), ("50%", "50"), (" 42 ", "42"), ("1,000,000", "1000000"), ("007", "7"), ("100", "100"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1/2", "--5", "1.2.3", "$", "five", "1e5", "NaN", "inf"])
def test_normalize_refuses_what_is_not_a_plain_number(text):
    assert normalize_number(text) is None


@pytest.mark.parametrize("output, expected, method", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "####"),
    ("#### 1,250", "1250", "####"),
    ("####$18.00", "18", "####"),
    ("#### **42**", "42", "####"),
    # several numbers: the #### line wins over later and earlier numbers
    ("5 * 3 = 15, so 15 - 2 = 13.\n#### 13\nQuestion 2 has 99", "13", "####"),
    ("So the answer is 64.", "64", "answer is"),
    ("The answer is: $1,000. That took 3 steps.", "1000", "answer is"),
    ("Answer: 12", "12", "answer is"),
    # no marker: the last number
    ("First 10 then 20 then 30.", "30", "last number"),
    ("It costs $12.50 in total.", "12.5", "last number"),
    ("He ends with -3 degrees", "-3", "last number"),
    # digits glued to words are not numbers of the answer
    ("x2 and y3", None, "none"),
    ("", None, "none"),
    ("I do not know.", None, "none"),
    ("#### none", None, "none"),
])
def test_extract_answer(output, expected, method):
    assert extract_answer(output) == (expected, method)


def test_lists_are_not_thousands():
    assert extract_answer("The options were 1,2,3")[0] == "3"


@pytest.mark.parametrize("output, reference, correct", [
    ("#### 18", "18", True), ("#### 18.0", "18", True), ("#### $18", "18", True), ("#### 18.5", "18", False),
    ("#### 180", "18", False), ("The answer is 1,800", "1800", True), ("", "18", False),
    ("#### 17\nThe answer is 18", "18", False),   # the #### line is the committed answer
    ("18 is what 17 + 1 makes; #### 19", "18", False),
])
def test_is_correct(output, reference, correct):
    assert is_correct(output, reference) is correct


def test_reference_answer_convention():
    assert reference_answer("Half of 36 is <<36/2=18>>18.\n#### 18") == "18"
    assert reference_answer("#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        reference_answer("no final line here")


@given(st.integers(min_value=-10**9, max_value=10**9), st.booleans(), st.booleans(), st.integers(0, 3))
def test_any_integer_formatting_normalises_to_the_integer(value, commas, dollar, zeros):
    text = f"{abs(value):,}" if commas else str(abs(value))
    if dollar:
        text = "$" + text
    if zeros:
        text += "." + "0" * zeros
    if value < 0:
        text = "-" + text
    assert normalize_number(text) == str(value)
    assert extract_answer(f"Some working 12 + 3.\n#### {text}") == (str(value), "####")


def test_every_dataset_answer_has_a_reference_number():
    try:
        paths = [data_file("gsm8k/test.jsonl"), data_file("gsm8k/train.jsonl")]
    except EvalError as err:
        pytest.skip(f"GSM8K data not here: {err}")
    for path in paths:
        records = list(read_jsonl(path))
        assert len(records) in (1319, 7473)
        for rec in records:
            ref = reference_answer(rec["answer"])
            assert is_correct(rec["answer"], ref), rec["answer"][-60:]   # the solution scores itself right
