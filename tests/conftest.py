"""Shared fixtures (a tiny randomly initialised BERT with the real MiniLM tokenizer; a small simulated cohort) and the
test layers.

Layers: `pytest -m "not slow"` is the fast one (units and small in-process pieces); `slow` marks what runs a whole
federation or trains through many steps: in-process integration (Flower's InProcessGrid, Ray simulations) and the
real-process end-to-end tests (Flower's processes on loopback, marked `processes` too). Under pytest-xdist
(`-n auto`, pyproject) the real-process tests run one at a time on one worker and the Ray simulations on another,
`--dist loadgroup`; everything else spreads over the workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from edfed.common.config import default_encoder_dir
from edfed.simulations.cohort import generate_cohort

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


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Six simulated sites of 120 visits each (seed 3), shared by the in-process federation and GLM tests."""
    return generate_cohort(tmp_path_factory.mktemp("cohort") / "cohort", visits_per_site=120, seed=3)


# Flower's SuperLink, SuperNodes and nginx on loopback: one such test at a time.
REAL_PROCESS_FILES = {"test_deployment", "test_perimeter", "test_runbook"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in REAL_PROCESS_FILES:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.processes)
            item.add_marker(pytest.mark.xdist_group("processes"))
        elif item.get_closest_marker("slow"):  # a Ray simulation or a long in-process run: one at a time
            item.add_marker(pytest.mark.xdist_group("simulations"))
