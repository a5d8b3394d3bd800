"""Shared fixtures: a tiny randomly initialised BERT (fast) with the real MiniLM tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from edfed.common.config import default_encoder_dir

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT saved as a plain Hugging Face directory, like a site's own encoder."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_encoder_dir() / name).exists():
            shutil.copy(default_encoder_dir() / name, path / name)
    return path
