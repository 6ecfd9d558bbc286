"""The CPU reader's training config (configs/train/memory_reader_cpu.yaml) is what the model reader needs."""

from __future__ import annotations

import pytest

from mamba_moe.data.chatml import render_chat_text
from mamba_moe.memory.reader import memory_messages
from mamba_moe.training.config import TrainConfig

CONFIG = "configs/train/memory_reader_cpu.yaml"


def test_config_loads_and_its_model_can_copy_from_the_prompt():
    cfg = TrainConfig.load(CONFIG)
    model = cfg.model.build()
    assert "attention" in model.layer_mixers                 # copying a value out of the prompt
    assert cfg.seq_len <= model.max_position_embeddings
    assert cfg.data.source == "chat" and cfg.data.pack and cfg.data.tokenizer
    assert all(p.startswith("runs/") for p in (cfg.data.path, cfg.data.tokenizer, cfg.output))   # git-ignored


@pytest.mark.parametrize("config", [CONFIG, "configs/train/memory_reader_gpu.yaml"])
def test_sample_prompt_is_the_readers_own_prompt(config):
    cfg = TrainConfig.load(config)
    facts = ["The user lives in Oslo.", "The user's sister's name is Ada."]
    assert cfg.sample_prompt == render_chat_text(memory_messages("Where do I live?", facts), add_generation_prompt=True)
