"""Shared test set-up: make ``tests/`` importable (for ``zoo``) and keep runs deterministic."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the kernels are held to."""
    denom = b.abs().max().clamp_min(1e-12)
    return float(((a - b).abs().max() / denom).detach())
