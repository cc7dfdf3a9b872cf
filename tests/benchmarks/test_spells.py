"""benchmarks/spells.py: the split of rounds into the reference's fast and slow halves, and the
script end to end on a small model (timings are not asserted)."""
import json

import pytest

from ispc.ops import native


def test_halves_split_by_the_reference(benchmark_script):
    halves = benchmark_script("spells.py").halves
    rounds = {"ort": [1.0, 2.0, 1.0, 2.0], "ispc": [0.5, 0.8, 0.5, 0.7]}
    h = halves(rounds, "ort")
    assert h["ort"]["slowdown"] == pytest.approx(2.0)
    assert h["ispc"]["fast_ms"] == pytest.approx(0.5)
    assert h["ispc"]["slow_ms"] == pytest.approx(0.75)
    assert h["ispc"]["spread"] == pytest.approx(0.6 / 0.5)


@pytest.mark.skipif(not native.available(), reason="native kernel not built here")
def test_spells_end_to_end(tmp_path, benchmark_script):
    pytest.importorskip("onnxruntime")
    import torch

    import ispc
    from ispc.examples.models import create_model

    torch.manual_seed(0)
    compiled = ispc.compile(create_model("mobilenet_v2").eval(), [torch.randn(2, 3, 32, 32)],
                            config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                     channels_last=True), progress=False)
    archive = ispc.save(compiled, tmp_path / "m.ispc", example_inputs=torch.randn(2, 3, 32, 32))
    out = tmp_path / "spells.json"
    assert benchmark_script("spells.py").main([
        "--saved", str(archive), "--model", "mobilenet_v2", "--image-size", "32",
        "--runtimes", "onnxruntime", "--rounds", "2", "--block-s", "0.01", "--threads", "1",
        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["runtime"] for r in res["rows"]} == {"onnxruntime", "ispc"}
    assert all(len(v) == 2 for v in res["rounds_ms"].values())
