"""benchmarks/compile_time.py: runs end to end on a small input and writes its JSON (times are not
asserted)."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_time.py"


def test_compile_time_writes_results(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compile_time", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ct.json"
    assert mod.main(["--models", "resnet20", "--image-size", "32", "--batch-size", "2",
                     "--latency-rounds", "1", "--calibration", "1", "4", "--profile", "5",
                     "--no-progress", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "resnet20" and row["compile_s"] > 0 and row["profiled"]
    assert "whole-model check" in " ".join(row["notes"]) or row["layers_gated"] == 0
    assert "cumulative" in capsys.readouterr().out
