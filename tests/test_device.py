"""The device setting: auto, cpu or cuda, read once; a missing GPU is a clear error, never a crash or a silent CPU."""

from __future__ import annotations

import pytest
import torch

from edfed.common.config import RUN_DEFAULTS, resolve_device
from edfed.common.errors import EdfedError
from edfed.common.train import fit_model

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")


def test_the_setting_has_one_default():
    assert RUN_DEFAULTS["device"] == "auto"
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EdfedError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")


def test_auto_takes_a_gpu_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)


@needs_no_gpu
def test_cuda_without_a_gpu_is_refused_before_any_work(tiny_encoder):
    with pytest.raises(EdfedError, match="torch sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(EdfedError, match="torch sees no CUDA GPU"):  # before the model is even built
        fit_model(None, None, None, None, device="cuda")
