"""benchmarks/speed.py: runs end to end on a small input, writes its JSON, and profiles per op
(timings themselves are not asserted)."""
import json


def test_speed_script_writes_results_and_profile(tmp_path, capsys, benchmark_script):
    mod = benchmark_script("speed.py")
    out = tmp_path / "speed.json"
    assert mod.main(["--models", "resnet18", "--batch-sizes", "1", "--image-size", "32",
                     "--rounds", "2", "--no-latency-aware", "--profile", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["model"] == "resnet18" and row["batch_size"] == 1
    assert 0 < row["mac_reduction"] < 1 and row["dense_ms"] > 0 and row["gated_ms"] > 0
    assert [r["model"] for r in data["overhead"]] == ["resnet18 keep=1.0"]
    (prof,) = data["profiles"]
    dense, gated = prof["ops"]["dense"], prof["ops"]["gated"]
    assert any(o["op"] == "aten::mkldnn_convolution" for o in dense)
    assert all(o["self_ms"] >= 0 and o["calls"] > 0 for o in gated)
    assert not any(o["op"] in ("aten::topk", "ispc::native_gated_conv") for o in dense)
    from ispc.ops import native

    if native.available():  # the C kernel is named in the profile; it selects channels itself
        assert any(o["op"] == "ispc::native_gated_conv" and o["calls"] >= 1 for o in gated)
        assert not any(o["op"] == "aten::topk" for o in gated)
    else:  # the gate's own work shows up only in the gated model: top-k selection and gathers
        assert any(o["op"] == "aten::topk" for o in gated)
    printed = capsys.readouterr().out
    assert "self CPU time per ATen op" in printed and "(all ops)" in printed
