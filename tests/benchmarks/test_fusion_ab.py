"""benchmarks/fusion_ab.py: runs end to end on a small input and writes its JSON (timings are not
asserted)."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fusion_ab.py"


def test_fusion_ab_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("fusion_ab", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ab.json"
    assert mod.main(["--models", "resnet18", "--image-size", "32", "--rounds", "2",
                     "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "resnet18"
    assert all(row[k] > 0 for k in ("dense_ms", "fused_ms", "unfused_ms", "fusion_gain"))
