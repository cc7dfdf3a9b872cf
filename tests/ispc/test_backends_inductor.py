"""backend="inductor": torch.compile of the gated graph equals eager (fullgraph in topk mode)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(24, 8, 1)).eval()


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_inductor_equals_eager(mode):
    model = _net()
    data = [torch.randn(4, 3, 12, 12)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode=mode)
    eager = ispc.compile(model, data, config=cfg, progress=False)
    comp = ispc.compile(model, data, config=cfg, backend="inductor", progress=False)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(comp(x), eager(x)) <= 1e-5
    assert comp.backend == "inductor" and comp.__dict__["_runner"] is not None


def test_tensorrt_backend_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this checks the error on machines without CUDA")
    with pytest.raises(ispc.BackendUnavailableError, match="CUDA|torch_tensorrt|tensorrt"):
        ispc.compile(_net(), [torch.randn(2, 3, 8, 8)], backend="tensorrt", progress=False)


def test_gated_linear_layers_compile_with_inductor():
    """A token MLP (nn.Linear over N x T x C): its GatedLinear layers run under torch.compile as
    the gated operator on the map view, equal to eager."""
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24)).eval()
    data = [torch.randn(4, 9, 24)]
    eager = ispc.compile(model, data, config=ispc.GatingConfig(mode="topk", min_channels=8),
                         progress=False)
    fast = ispc.compile(model, data, config=ispc.GatingConfig(mode="topk", min_channels=8),
                        backend="inductor", progress=False)
    assert len(fast.gated_modules()) == 2
    x = torch.randn(3, 9, 24)
    with torch.no_grad():
        assert rel_err(fast(x), eager(x)) <= 1e-5
