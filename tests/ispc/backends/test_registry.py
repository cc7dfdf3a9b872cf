"""ispc.backends.BACKENDS: one registry for compile, load and the command line."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn

import ispc
from ispc.backends import BACKENDS, get_backend
from ispc.cli import build_parser


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()


def test_names_and_errors():
    assert list(BACKENDS) == ["eager", "inductor", "tensorrt", "cuda_graphs"]
    assert ispc.BACKENDS is BACKENDS
    assert not BACKENDS["tensorrt"].reloads and BACKENDS["inductor"].reloads
    assert not BACKENDS["cuda_graphs"].reloads  # an archive loads on the CPU
    with pytest.raises(ispc.BackendUnavailableError,
                       match="available: eager, inductor, tensorrt, cuda_graphs"):
        get_backend("tvm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_refuses_before_calibrating_without_cuda():
    def never():
        raise AssertionError("calibration data was read")
        yield

    with pytest.raises(ispc.BackendUnavailableError, match="needs an NVIDIA GPU"):
        ispc.compile(_net(), never(), backend="cuda_graphs")


def test_the_command_line_offers_every_backend():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compile"]
    backend = next(a for a in sub._actions if a.dest == "backend")
    assert backend.choices == list(BACKENDS) and backend.default == "eager"


def test_load_attaches_a_reloadable_backend_and_notes_the_others(tmp_path):
    data = [torch.randn(4, 3, 8, 8)]
    compiled = ispc.compile(_net(), data, config=ispc.GatingConfig(mode="topk"), progress=False)
    path = ispc.save(compiled, tmp_path / "m.ispc")

    def with_backend(name):
        with zipfile.ZipFile(path) as zf:
            manifest, weights = json.loads(zf.read("manifest.json")), zf.read("weights.pt")
        manifest["backend"] = name
        out = tmp_path / f"{name}.ispc"
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("manifest.json", json.dumps(manifest))
            zf.writestr("weights.pt", weights)
        return ispc.load(out)

    trt = with_backend("tensorrt")
    assert trt.backend == "eager" and any("'tensorrt'" in n for n in trt.report.notes)
    ind = with_backend("inductor")
    assert ind.backend == "inductor" and ind.__dict__["_runner"] is not None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(trt(x), compiled(x), atol=1e-6)
