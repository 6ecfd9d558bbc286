"""bench/memory_reader.py's parts that several trainings rest on: pooling a rate over evaluation seeds, and
running commands at once without losing a failure."""

from __future__ import annotations

import sys

import pytest
from helpers.bench import import_bench


@pytest.fixture(scope="module")
def memory_reader():
    yield from import_bench("memory_reader")


def test_pooled_counts_right_answers_not_an_average_of_rates(memory_reader):
    entries = [{"value": 0.75, "n": 4, "latest": {"value": None, "n": 0}},
               {"value": 0.5, "n": 10, "latest": {"value": 1.0, "n": 3}}]
    assert memory_reader.pooled(entries) == (8, 14)            # (3 + 5) / 14, not (0.75 + 0.5) / 2
    assert memory_reader.pooled(entries, "latest") == (3, 3)    # a seed without such probes adds nothing


def test_run_all_waits_for_every_command_and_names_the_failed_log(memory_reader, tmp_path):
    ok, bad = tmp_path / "ok.log", tmp_path / "bad.log"
    seconds = memory_reader.run_all([([sys.executable, "-c", "print('fine')"], ok),
                                     ([sys.executable, "-c", "print('x')"], tmp_path / "ok2.log")])
    assert len(seconds) == 2
    assert ok.read_text() == "fine\n"
    with pytest.raises(SystemExit, match="bad.log.*exit code 3"):
        memory_reader.run_all([([sys.executable, "-c", "import sys; sys.exit(3)"], bad),
                               ([sys.executable, "-c", "import time; time.sleep(0.5); print('still run')"], ok)])
    assert ok.read_text() == "still run\n"        # the failure did not stop the wait for the slower one
