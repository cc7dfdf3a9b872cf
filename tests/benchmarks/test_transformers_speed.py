"""benchmarks/transformers_speed.py: runs end to end (a small-config Hugging Face ConvNeXt in place
of ConvNeXt-T, 32x32 inputs) and writes its JSON with the per-layer split (timings themselves are
not asserted)."""
import json

import pytest

import zoo


def _script(monkeypatch, benchmark_script):
    """The script as a module, its models replaced by a small Hugging Face ConvNeXt."""
    mod = benchmark_script("transformers_speed.py")
    monkeypatch.setattr(mod, "build", lambda name: zoo.hf_model("convnext"))
    return mod


def test_transformers_speed_script_writes_results(tmp_path, monkeypatch, capsys, benchmark_script):
    pytest.importorskip("transformers")
    mod = _script(monkeypatch, benchmark_script)
    out = tmp_path / "t.json"
    assert mod.main(["--models", "convnext_tiny", "--image-size", "32", "--calibration", "8",
                     "--rounds", "2", "--threads", "1", "--no-latency-aware", "--per-layer",
                     "--json", str(out)]) == 0
    (m,) = json.loads(out.read_text())["models"]
    assert m["summary"]["capture"].startswith("export")
    assert m["channel_linears"]["gated"] >= 2 and m["channel_linears"]["linear_layers"] >= 2
    (r,) = m["results"]
    assert r["theoretical_speedup"] > 1 and r["dense_ms"] > 0 and r["gated_ms"] > 0
    pl = m["per_layer"]
    assert pl["gated_dense_ms"] > 0 and pl["gated_gated_ms"] > 0
    assert "channel linears gated" in capsys.readouterr().out


def test_transformers_speed_script_times_dense_runtimes(tmp_path, monkeypatch, benchmark_script):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    mod = _script(monkeypatch, benchmark_script)
    out = tmp_path / "t.json"
    assert mod.main(["--models", "convnext_tiny", "--image-size", "32", "--calibration", "8",
                     "--rounds", "2", "--threads", "1", "--no-latency-aware", "--runtimes",
                     "onnxruntime", "--runtime-rounds", "1", "--json", str(out)]) == 0
    (m,) = json.loads(out.read_text())["models"]
    kinds = {r["kind"]: r for r in m["runtimes"]}
    assert kinds["dense"]["runtime"] == "onnxruntime" and kinds["dense"]["available"]
    assert kinds["ispc"]["median_ms"] > 0 and kinds["ispc"]["max_rel_err"] < 1e-3
