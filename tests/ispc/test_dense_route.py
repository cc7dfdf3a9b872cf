"""ispc.dense_route: the module a dense route's graph calls, and the graph around it."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import fx, nn

from conftest import rel_err
from ispc import dense_route as route

pytestmark = pytest.mark.dense_runtimes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, pixels):
        return self.fc(torch.relu(self.conv(pixels)).mean((2, 3)))


@pytest.fixture(scope="module")
def onnx():
    torch.manual_seed(0)
    model = Net().eval()
    return model, route.onnx_bytes(model, torch.randn(2, 3, 8, 8))


def test_the_export_prints_nothing(capfd, caplog, recwarn):
    """Every compile that considers the route exports: the exporter's log lines and deprecation
    warnings ("torchvision is not installed. Skipping ...") stay out of the user's stderr."""
    pytest.importorskip("onnxscript")
    caplog.set_level(logging.INFO)
    data = route.onnx_bytes(Net().eval(), torch.randn(2, 3, 8, 8))
    out, err = capfd.readouterr()
    assert data and out == "" and err == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize("runtime", route.ROUTE_RUNTIMES)
def test_module_runs_the_runtime_at_any_batch(onnx, runtime):
    if not route.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    model, data = onnx
    m = route.DenseRuntimeModule(model, runtime, data, (2, 3, 8, 8))
    with torch.no_grad():
        for n in (1, 2, 7):
            x = torch.randn(n, 3, 8, 8)
            y = m(x)
            assert y.dtype == torch.float32 and rel_err(y, model(x)) < 1e-5
    if runtime == "openvino":
        assert sorted(m.__dict__["_requests"]) == [(1, 3, 8, 8), (2, 3, 8, 8), (7, 3, 8, 8)]
    else:
        sess = m.__dict__["_session"]
        assert sess is not None
        assert sess.get_session_options().intra_op_num_threads == torch.get_num_threads()


def test_wrap_keeps_the_input_name_and_runtime_only_switches(onnx):
    model, data = onnx
    m = route.DenseRuntimeModule(model, "onnxruntime", data, (2, 3, 8, 8))
    gm = fx.symbolic_trace(model)
    wrapped = route.wrap(gm, m)
    assert route.routed(wrapped) is m and route.routed(gm) is None
    calls = []
    model.conv.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), route.runtime_only(wrapped, False):
        assert rel_err(wrapped(pixels=x), model(x)) < 1e-6  # by keyword, through the torch model
    assert len(calls) == 2 and m.use_runtime


def test_unknown_runtime_refused(onnx):
    with pytest.raises(ValueError, match="unknown dense runtime"):
        route.DenseRuntimeModule(onnx[0], "tensorrt", onnx[1], (2, 3, 8, 8))
