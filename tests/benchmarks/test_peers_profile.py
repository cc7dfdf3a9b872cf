"""benchmarks/peers_profile.py --runtime openvino: OpenVINO's per-node profile beside ispc's native
program op by op (timings are not asserted: every op gets a time and its OpenVINO nodes)."""
import importlib.util
import json

import pytest

from ispc.ops import native


def test_layer_keys_and_blocks(benchmark_script):
    prof = benchmark_script("peers_profile.py")
    assert prof.block_of("features.5.conv.0.0") == "features.5"
    assert prof.block_of("classifier.1") == "classifier.1"
    assert prof.block_of("layer1.0.conv1") == "layer1.0"
    assert prof.block_of("fc") == "fc"
    row = {"layers": "flatten+dropout+classifier.1+ispc_to_contiguous",
           "modules": "flatten.using_ints+dropout.default+Linear+ToMemoryFormat"}
    assert prof.ispc_keys(row) == ["flatten", "dropout", "classifier.1", "layout"]
    assert prof.ispc_keys({"layers": "global_avg_pool", "modules": "GlobalAvgPool2d"}) == ["pool"]
    layers = {"node_Conv_1": "features.0.0", "output": "classifier.1"}
    assert prof.ov_key("node_Conv_1", "Convolution", layers) == "features.0.0"
    assert prof.ov_key("output", "FullyConnected", layers) == "classifier.1"
    assert prof.ov_key("input_abcd_acdb_node_Conv_1", "Reorder", layers) == "layout"
    assert prof.ov_key("node_mean", "ReduceMean", layers) == "pool"
    assert prof.ov_key("node_x", "Eltwise", layers) == "other"


def test_ops_matched_to_nodes(benchmark_script, monkeypatch):
    """An ispc op that fuses two layers gets both layers' OpenVINO nodes; medians per node over
    the calls, per op over the processes; nodes no op covers are listed."""
    prof = benchmark_script("peers_profile.py")
    monkeypatch.setattr(prof, "ov_layer_names", lambda path: {
        "c1": "features.1.conv.0.0", "c2": "features.1.conv.1", "c3": "features.1.conv.2"})

    def call(t1, t2, t3):
        return {"c1": [t1, "Convolution", "brgconv"], "c2": [t2, "GroupConvolution", "dw"],
                "c3": [t3, "Convolution", "brgconv"], "x": [0.5, "Eltwise", "jit"]}
    ov = [{"runs": [call(1.0, 2.0, 3.0), call(3.0, 2.0, 1.0), call(2.0, 9.0, 2.0)],
           "wall_ms": [9.0, 10.0, 11.0], "unprofiled_ms": [8.0], "version": "test"}]
    rows = [{"layers": "features.1.conv.0.0+features.1.conv.1", "modules": "A+B", "ms": 1.0},
            {"layers": "features.1.conv.2", "modules": "A", "ms": 0.5}]
    ops = [{"rows": rows, "whole_ms": 2.0},
           {"rows": [dict(r, ms=r["ms"] * 3) for r in rows], "whole_ms": 4.0},
           {"rows": [dict(r, ms=r["ms"] * 2) for r in rows], "whole_ms": 3.0}]
    res = prof.analyse_ov_vs_ops(ov, ops, "unused.onnx")
    first, second = res["ops"]
    assert first["openvino_ms"] == 4.0 and first["ispc_ms"] == 2.0  # 2 + 2; median of 1, 3, 2
    assert second["openvino_ms"] == 2.0 and second["ispc_ms"] == 1.0
    assert res["blocks"] == {"features.1": {"ispc_ms": 3.0, "openvino_ms": 6.0}}
    assert res["openvino_uncovered_ms"] == {"other": 0.5}
    assert res["openvino"]["whole_ms"] == 10.0 and res["ispc"]["whole_ms"] == 3.0
    assert "features.1" in prof.ov_table("m", res)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino is not installed (pip install openvino)")
@pytest.mark.skipif(not native.available(), reason="native kernel not built here")
def test_openvino_beside_program_ops(benchmark_script, tmp_path):
    out = tmp_path / "ov.json"
    assert benchmark_script("peers_profile.py").main([
        "--runtime", "openvino", "--models", "mobilenet_v2", "--keep-ratio", "1.0",
        "--size", "32", "--rounds", "1", "--runs", "3", "--warmup", "1",
        "--compiled-dir", str(tmp_path), "--onnx-dir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["models"]["mobilenet_v2"]
    convs = [r for r in res["ops"] if "conv" in r["op"] or r["op"].startswith("features")]
    assert convs and all(r["ispc_ms"] > 0 and r["openvino_ms"] > 0 for r in convs)
    assert all(r["openvino_nodes"] for r in convs)
    # (at 32x32 the last blocks' 1x1 maps may run outside the program: their nodes are listed
    # under openvino_uncovered_ms)
    assert {"features.0", "features.5", "classifier.1"} <= set(res["blocks"])
    assert res["blocks"]["classifier.1"]["openvino_ms"] > 0
    assert res["openvino"]["whole_ms"] > 0 and res["ispc"]["ops_sum_ms"] > 0
