"""ONNX lowering of the gated op, checked on ONNX Runtime (CPU) against eager PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err
from ispc.ops import gated_conv as gc

ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime not installed (pip install ispc[onnx])")
pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install ispc[onnx])")
onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install ispc[onnx])")

from ispc.backends.onnx import export_onnx, onnx_translation  # noqa: E402


def _value(y):
    return y.value if hasattr(y, "value") else np.asarray(y)


# (mode, threshold, k, saliency): the translation's branches
CASES = [(gc.TOPK, 0.0, 5, gc.SALIENCY_L2), (gc.TOPK, 0.0, 5, gc.SALIENCY_L1),
         (gc.THRESHOLD, 0.8, 0, gc.SALIENCY_L2), (gc.TOPK, 0.0, 0, gc.SALIENCY_L2),
         (gc.TOPK, 0.0, 12, gc.SALIENCY_L2), (gc.THRESHOLD, 0.0, 0, gc.SALIENCY_L1)]


@pytest.mark.parametrize("formulation,batch", [("masked", None), ("gathered", 3), ("gathered", 1)])
@pytest.mark.parametrize("mode,thr,k,sal", CASES)
def test_translation_matches_reference(formulation, batch, mode, thr, k, sal):
    """Runs the ONNX Script translation eagerly (op by op on ONNX Runtime)."""
    n = batch or 2
    x, w = torch.randn(n, 12, 7, 6), torch.randn(5, 12, 3, 3)
    b, scale = torch.randn(5), torch.rand(12) + 0.5
    args = (2, 1, 1, 0, 1, 2, mode, thr, k, sal)
    fn = onnx_translation(18, formulation=formulation, static_batch=batch)
    got = _value(fn(x.numpy(), w.numpy(), b.numpy(), scale.numpy(), *args))
    want = gc.gated_conv2d_reference(x, w, b, scale, *args)
    assert got.shape == tuple(want.shape)
    assert rel_err(torch.from_numpy(np.ascontiguousarray(got)), want) < 1e-5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.body = nn.Conv2d(24, 24, 3, padding=1)
        self.down = nn.Conv2d(24, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.down(torch.relu(x + self.body(x)))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    return {mode: ispc.compile(Net().eval(), data, progress=False,
                               config=ispc.GatingConfig(keep_ratio=0.5, mode=mode))
            for mode in ("topk", "threshold")}


def _inputs(n, seed=1234):
    """Fresh inputs, not calibration samples: thresholds are calibrated as exact sample saliencies,
    so a calibration input sits exactly on a threshold, where float rounding (ONNX Runtime's
    ReduceL2 vs torch's vector_norm) may legitimately decide either way."""
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed + n))


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]), sess


def _ops(path):
    model = onnx.load(str(path))
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "only standard ONNX ops"
    return model, [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_dynamic_batch_masked_on_onnxruntime(models, mode, tmp_path):
    compiled = models[mode]
    path = tmp_path / f"{mode}.onnx"
    export_onnx(compiled, path, torch.randn(2, 3, 16, 16), dynamic_batch=True)
    _, ops = _ops(path)
    assert ops.count("Conv") == 3 and ("ScatterElements" in ops if mode == "topk"
                                       else "GreaterOrEqual" in ops)
    for n in (1, 5):
        x = _inputs(n)
        got, sess = _run(path, x)
        assert not isinstance(sess.get_inputs()[0].shape[0], int)  # symbolic batch
        with torch.no_grad():
            assert rel_err(got, compiled(x)) < 1e-5


def test_static_batch_gathered_on_onnxruntime(models, tmp_path):
    compiled = models["topk"]
    path = tmp_path / "gathered.onnx"
    export_onnx(compiled, path, torch.randn(3, 3, 16, 16), dynamic_batch=False)
    model, ops = _ops(path)
    assert "GatherElements" in ops and "ScatterElements" not in ops
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]
    assert groups.count(3) == len(compiled.gated_modules())  # one grouped conv per gated layer
    x = _inputs(3)
    got, _ = _run(path, x)
    with torch.no_grad():
        assert rel_err(got, compiled(x)) < 1e-5


def test_bad_options(models, tmp_path):
    with pytest.raises(ValueError, match="static batch"):
        export_onnx(models["topk"], tmp_path / "x.onnx", torch.randn(2, 3, 16, 16),
                    formulation="gathered", dynamic_batch=True)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(models["topk"], tmp_path / "x.onnx", torch.randn(2, 3, 16, 16), opset=17)
