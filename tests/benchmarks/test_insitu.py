"""benchmarks/insitu.py: a compiled model end to end on small inputs (timings are not asserted):
every channels-last convolution of the forward pass is captured and replayed."""
import json

import pytest
import torch

import ispc
from ispc.examples.models import create_model
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built here")


def test_compiled_model_layers_replayed(tmp_path, benchmark_script):
    out = tmp_path / "insitu.json"
    assert benchmark_script("insitu.py").main([
        "--models", "resnet18", "--image-size", "32", "--batch-size", "2", "--runs", "2",
        "--flush-mb", "1", "--no-latency-aware", "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    rows = res["layers"]
    assert res["batch"] == 2 and rows and any(r["gated"] for r in rows)
    assert all(r["insitu_ms"] > 0 and r["warm_ms"] > 0 and r["cold_ms"] > 0 for r in rows)
    assert all(r["layer"].endswith(("conv1", "conv2", "0")) for r in rows)  # named by module


def test_replay_is_the_call_the_model_made(benchmark_script):
    """A captured call replayed alone writes what it wrote inside the model, and layer_rows
    replays one row per channels-last convolution call of the forward pass."""
    torch.manual_seed(0)
    compiled = ispc.compile(create_model("resnet18").eval(), [torch.randn(2, 3, 32, 32)],
                            config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                     channels_last=True), progress=False)
    calls = []
    orig = native.NhwcConv.run

    def record(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls.append((self, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], out))
        return out

    x = torch.randn(1, 3, 32, 32)
    native.NhwcConv.run = record
    try:
        with torch.no_grad():
            compiled.graph_module(x)  # layer by layer (the eager runner's one call skips run())
    finally:
        native.NhwcConv.run = orig
    assert calls
    for nh, args, out in calls:
        assert torch.equal(orig(nh, *args), out)
    rows = benchmark_script("insitu.py").layer_rows(compiled, x, runs=1, flush_mb=1)
    assert len(rows) == len(calls)
