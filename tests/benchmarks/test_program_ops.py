"""benchmarks/program_ops.py: a compiled model end to end on small inputs (timings are not
asserted): every op of its native program gets a time, named by the layers it covers."""
import json

import pytest

from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built here")


def test_program_ops_timed_and_named(tmp_path, benchmark_script):
    out = tmp_path / "ops.json"
    assert benchmark_script("program_ops.py").main([
        "--models", "resnet18", "--image-size", "32", "--runs", "2", "--no-latency-aware",
        "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    rows = res["ops"]
    assert res["programs_planned"] >= 1 and rows and all(r["ms"] > 0 for r in rows)
    layers = [name for r in rows for name in r["layers"].split("+")]
    assert "layer1.0.conv1" in layers and "layer4.1.conv2" in layers
    assert any("GatedConv2d" in r["modules"] for r in rows)
    assert all(t is None or t > 0 for t in res["programs_ms"]) and res["whole_ms"] > 0


def test_program_ops_left_the_programs_as_they_were(benchmark_script):
    """The timed runs replace each program's run method for their duration only."""
    import torch

    import ispc
    from ispc.examples.models import create_model

    torch.manual_seed(0)
    compiled = ispc.compile(create_model("resnet18").eval(), [torch.randn(2, 3, 32, 32)],
                            config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                     channels_last=True), progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = compiled(x)
    rows, _ = benchmark_script("program_ops.py").op_rows(compiled, x, runs=2)
    assert rows
    for prog in compiled.__dict__["_runner"]._programs:
        for _, plan in prog._plans.values():
            assert plan is None or "run" not in vars(plan.program)
    with torch.no_grad():
        assert torch.equal(compiled(x), want)
