"""benchmarks/insitu.py: a compiled and a saved model end to end on small inputs (timings are not
asserted): every channels-last convolution of the forward pass is captured and replayed."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import ispc
from ispc.examples.models import create_model
from ispc.ops import native

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "insitu.py"
pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built here")


def _module():
    spec = importlib.util.spec_from_file_location("insitu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compiled_model_layers_replayed(tmp_path):
    out = tmp_path / "insitu.json"
    assert _module().main(["--models", "resnet18", "--image-size", "32", "--batch-size", "2",
                           "--runs", "2", "--flush-mb", "1", "--no-latency-aware",
                           "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    rows = res["layers"]
    assert res["batch"] == 2 and rows and any(r["gated"] for r in rows)
    assert all(r["insitu_ms"] > 0 and r["warm_ms"] > 0 and r["cold_ms"] > 0 for r in rows)
    assert all(r["layer"].endswith(("conv1", "conv2", "0")) for r in rows)  # named by module


def test_replayed_call_writes_what_the_model_wrote(tmp_path):
    """The replay runs each layer on its captured inputs: the same output as inside the model."""
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    calib = [torch.randn(2, 3, 32, 32)]
    compiled = ispc.compile(model, calib, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                              channels_last=True),
                            progress=False)
    outs = []
    orig = native.NhwcConv.run

    def record(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        outs.append((self, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], out))
        return out

    native.NhwcConv.run = record
    try:
        with torch.no_grad():
            compiled(torch.randn(1, 3, 32, 32))
    finally:
        native.NhwcConv.run = orig
    assert outs
    nh, args, out = outs[-1]
    assert torch.equal(orig(nh, *args), out)
    rows = _module().layer_rows(compiled, torch.randn(1, 3, 32, 32), runs=1, flush_mb=1)
    assert len(rows) == len(outs)
