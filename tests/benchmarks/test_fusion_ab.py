"""benchmarks/fusion_ab.py: runs end to end on a small input and writes its JSON (timings are not
asserted)."""
import json


def test_fusion_ab_writes_results(tmp_path, benchmark_script):
    mod = benchmark_script("fusion_ab.py")
    out = tmp_path / "ab.json"
    assert mod.main(["--models", "resnet18", "--image-size", "32", "--rounds", "2",
                     "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "resnet18"
    assert all(row[k] > 0 for k in ("dense_ms", "fused_ms", "unfused_ms", "fusion_gain"))
