"""examples/gpu_check.py: its harness on the CPU (the GPU runs are recorded in examples/results)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_check.py"


@pytest.fixture()
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_refuses_to_run_without_cuda(gpu_check, capsys) -> None:
    assert gpu_check.main(["--sections", "kernel"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_check_compares_the_operator_with_a_float64_reference(gpu_check, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")  # the CPU kernels stand in for the Triton one
    result = gpu_check.check_kernel(cases=6, seed=1)
    assert result["cases"] == 6 and result["all_finite"] and result["over_1e-4"] == 0
    assert 0 < result["max_rel_err"] < 1e-5
    assert {r["mode"] for r in result["rows"]} <= {"topk", "threshold"}
