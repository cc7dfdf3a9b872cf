"""benchmarks/compile_time.py: runs end to end on a small input and writes its JSON (times are not
asserted)."""
import json


def test_compile_time_writes_results(tmp_path, capsys, benchmark_script):
    mod = benchmark_script("compile_time.py")
    out = tmp_path / "ct.json"
    assert mod.main(["--models", "resnet20", "--image-size", "32", "--batch-size", "2",
                     "--latency-rounds", "1", "--calibration", "1", "4", "--profile", "5",
                     "--no-progress", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "resnet20" and row["compile_s"] > 0 and row["profiled"]
    assert "whole-model check" in " ".join(row["notes"]) or row["layers_gated"] == 0
    assert "cumulative" in capsys.readouterr().out
