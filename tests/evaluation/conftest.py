"""Fixtures of the evaluation tests: a toy checkpoint (seeded per run, replayable) and tiny GSM8K-shaped data.

The GSM8K files are written here, not read from ../shared/data, so the harness is tested on a clean clone;
the tests that read the real data skip with a message when it is absent.
"""

from __future__ import annotations

import json
import random

import pytest
from helpers.serving import TOY_SEED
from helpers.toy import save_toy_checkpoint


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory):
    print(f"toy checkpoint seed: {TOY_SEED} (replay with MAMBA_MOE_TEST_SEED={TOY_SEED})")
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy"), max_position_embeddings=1024, seed=TOY_SEED)


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory):
    """A data folder with gsm8k/train.jsonl (12 problems) and gsm8k/test.jsonl (6) in the dataset's format."""
    root = tmp_path_factory.mktemp("data")
    (root / "gsm8k").mkdir()
    rng = random.Random(TOY_SEED)

    def problem(i):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}"}

    for name, n in (("train", 12), ("test", 6)):
        with open(root / "gsm8k" / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(problem(i)) + "\n" for i in range(n))
    return root
