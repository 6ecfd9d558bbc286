"""Shared test set-up: fresh random inputs on every run, with the seed printed for reproduction."""

from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seed torch from the OS (or MAMBA_MOE_TEST_SEED to replay) and report the seed on failure."""
    seed = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"test seed: {seed} (replay with MAMBA_MOE_TEST_SEED={seed})")
    yield seed


@pytest.fixture(autouse=True)
def keep_threads():
    """Restore torch's thread count after each test: trainers set it from their config (``threads``)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer dir, shards dir) of the tiny stdlib corpus the training tests share (built once)."""
    from helpers.training import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models decode faster so, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
