"""ispc.runtimes: every runtime's worker computes the model's outputs, missing runtimes are skipped
with a note, and the records, comparisons, table and JSON carry what the benchmark reports.

No timing assertions: a few calls per runtime, one round, on a model small enough that the whole
module runs in seconds (inductor's compile is most of it)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ispc
from ispc import runtimes as rt
from ispc.benchmark import input_batches
from ispc.errors import ConfigError, DataError


def tiny_model() -> nn.Module:
    """Plain torch.nn classes (they unpickle in any fresh process), non-trivial BatchNorm."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 2 - 1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    model = tiny_model()
    calib = [torch.randn(8, *SHAPE) for _ in range(2)]
    compiled = ispc.compile(model, calib, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk"),
                            progress=False)
    batches = input_batches(2, input_shape=SHAPE, pool=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timings = rt.time_runtimes(model, compiled, batches, rounds=1, calls=2, warmup=1, threads=2,
                               in_process=True, name="tiny", progress=False)
    return model, compiled, timings, before


def by_name(timings, name):
    return next(t for t in timings if t.runtime == name)


def test_every_runtime_is_recorded_once_with_the_ispc_models(measured):
    _, _, timings, _ = measured
    names = [t.runtime for t in timings]
    assert names == [*rt.DENSE_RUNTIMES, "ispc", "ispc in-process"]
    assert {t.kind for t in timings} == {"dense", "ispc", "ispc-in-process"}
    assert all(t.model == "tiny" and t.batch_size == 2 for t in timings)


@pytest.mark.parametrize("name", rt.DENSE_RUNTIMES)
def test_each_dense_worker_computes_the_models_outputs(measured, name):
    _, _, timings, _ = measured
    t = by_name(timings, name)
    installed, why = rt.runtime_available(name)
    if not installed:
        assert not t.available and why in t.note
        pytest.skip(why)
    assert t.available, t.note
    assert len(t.times_ms) == 2 and len(t.round_medians_ms) == 1 and len(t.prepare_s) == 1
    assert t.median_ms > 0 and t.version
    # a diagnostic, over two sub-millisecond calls here: present, not a measurement to check
    assert len(t.cpu_share) == 1 and t.cpu_share[0] >= 0.0
    if t.precision == "float32":
        assert t.max_rel_err < 1e-4, (name, t.max_rel_err, t.note)
    else:  # OpenVINO's default on an AMX CPU: bf16, named, close but not float32-exact
        assert name == "openvino_default" and t.precision == "bfloat16"
        assert "bf16" in t.label and "not a float32 result" in t.note
        assert t.max_rel_err < 0.1


def test_ispc_loaded_in_a_fresh_process_equals_the_compiled_model(measured):
    _, _, timings, _ = measured
    loaded, here = by_name(timings, "ispc"), by_name(timings, "ispc in-process")
    for t in (loaded, here):
        assert t.available, t.note
        assert t.max_rel_err < 1e-5
        assert t.theoretical_speedup > 1.0 and 0.0 < t.mac_reduction < 1.0
    assert loaded.theoretical_speedup == here.theoretical_speedup


def test_the_users_model_is_left_as_it_was(measured):
    model, _, _, before = measured
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compare_uses_the_fastest_float32_dense_runtime(measured):
    _, _, timings, _ = measured
    best = rt.best_dense(timings, "tiny", 2)
    assert best is not None and best.float32 and best.kind == "dense"
    assert all(best.median_ms <= t.median_ms for t in timings
               if t.kind == "dense" and t.available and t.float32)
    comps = rt.compare(timings)
    assert [c.ispc for c in comps] == ["ispc", "ispc in-process"]
    c = comps[0]
    assert c.baseline == best.runtime
    assert c.speedup == pytest.approx(best.median_ms / c.ispc_ms)
    assert c.efficiency == pytest.approx(c.speedup / c.theoretical_speedup)
    assert set(c.over) == {t.runtime for t in timings if t.kind == "dense" and t.available}
    eager = rt.compare(timings, baseline="eager")[0]
    assert eager.baseline == "eager"
    assert eager.speedup == pytest.approx(by_name(timings, "eager").median_ms / eager.ispc_ms)
    with pytest.raises(ConfigError, match="baseline"):
        rt.compare(timings, baseline="fastest")


def test_paired_speedup_divides_round_by_round():
    """A round the machine slowed for every entry cancels out of the paired ratio; the median of
    all calls does not."""
    def rec(name, rounds, kind="dense", precision="float32"):
        return rt.RuntimeTiming(runtime=name, label=name, model="m", batch_size=1, kind=kind,
                                available=True, precision=precision,
                                times_ms=tuple(rounds), round_medians_ms=tuple(rounds))

    timings = [rec("onnxruntime", [10.0, 20.0, 10.0]), rec("openvino", [9.0, 30.0, 12.0]),
               rec("openvino_default", [1.0, 1.0, 1.0], precision="bfloat16"),
               rec("ispc", [5.0, 10.0, 5.0], kind="ispc")]
    (c,) = rt.compare(timings)
    # rounds: min(10, 9) / 5, min(20, 30) / 10, min(10, 12) / 5 (bf16 never the baseline)
    assert c.paired_speedup == pytest.approx(2.0) and c.paired_range == pytest.approx((1.8, 2.0))
    (ort,) = rt.compare(timings, baseline="onnxruntime")
    assert ort.paired_speedup == pytest.approx(2.0) and ort.paired_range == pytest.approx((2.0, 2.0))
    short = [*timings[:3], rec("ispc", [5.0, 10.0], kind="ispc")]  # rounds do not pair up
    assert rt.compare(short)[0].paired_speedup is None
    assert "paired by round 2.00x (1.80-2.00x)" in rt.speedup_lines(timings)[0]


def test_a_bf16_runtime_is_never_the_baseline():
    def rec(name, ms, precision, kind="dense"):
        return rt.RuntimeTiming(runtime=name, label=name, model="m", batch_size=1, kind=kind,
                                available=True, precision=precision, times_ms=(ms,),
                                theoretical_speedup=2.0 if kind != "dense" else None)

    timings = [rec("onnxruntime", 10.0, "float32"), rec("openvino_default", 3.0, "bfloat16"),
               rec("ispc", 5.0, "float32", kind="ispc")]
    assert rt.best_dense(timings, "m", 1).runtime == "onnxruntime"
    (c,) = rt.compare(timings)
    assert c.baseline == "onnxruntime" and c.speedup == pytest.approx(2.0)
    assert c.efficiency == pytest.approx(1.0)
    assert c.over["openvino_default"] == pytest.approx(0.6)
    table = rt.runtimes_table(timings)
    assert "**10.00**" in table and "2.00x" in table
    assert "10.00*" in rt.runtimes_table(timings, tablefmt="simple")


def test_table_and_json_carry_the_record(measured):
    _, _, timings, _ = measured
    table = rt.runtimes_table(timings)
    assert "tiny" in table and "**" in table and "ispc vs best" in table
    doc = json.loads(rt.runtimes_json(timings, machine=rt.machine_info(2), command="test"))
    m = doc["machine"]
    assert m["threads"] == 2 and m["cpu"] and set(m["isa"]) >= {"avx2", "avx512f", "amx"}
    assert m["versions"]["torch"] == torch.__version__ and "onnxruntime" in m["versions"]
    assert set(m["runtimes"]) == set(rt.DENSE_RUNTIMES)
    assert doc["command"] == "test" and doc["baseline"] == "best"
    rec = doc["timings"][0]
    for key in ("runtime", "label", "precision", "version", "median_ms", "iqr_ms", "times_ms",
                "round_medians_ms", "round_iqrs_ms", "prepare_s", "cpu_share", "max_rel_err",
                "available", "note"):
        assert key in rec
    assert rt.RuntimeTiming.from_dict(rec) == timings[0]
    assert {"speedup", "baseline", "theoretical_speedup", "efficiency", "over"} <= set(
        doc["comparisons"][0])


def test_a_missing_runtime_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(rt.RUNTIMES, "onnxruntime",
                        rt.Runtime("onnxruntime", "ORT", "no-such-onnxruntime-dist", "onnx"))
    model = tiny_model()
    batches = input_batches(1, input_shape=SHAPE, pool=1)
    timings = rt.time_runtimes(model, None, batches, runtimes=["onnxruntime"], rounds=2, calls=1,
                               warmup=0, progress=False)
    (t,) = timings
    assert not t.available and t.times_ms == () and "not installed" in t.note
    assert rt.compare(timings) == []
    assert "n/a" in rt.runtimes_table(timings)


def test_a_worker_that_fails_is_recorded_not_raised(tmp_path):
    model = tiny_model()
    batches = input_batches(1, input_shape=SHAPE, pool=1)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    (t,) = rt.time_runtimes(model, None, batches, runtimes=["onnxruntime"], rounds=1, calls=1,
                            warmup=0, onnx_path=bad, progress=False)
    assert not t.available and "failed" in t.note


def test_bad_arguments_fail_with_one_line():
    model = tiny_model()
    batches = input_batches(1, input_shape=SHAPE, pool=1)
    with pytest.raises(ConfigError, match="unknown runtime"):
        rt.time_runtimes(model, None, batches, runtimes=["tensorflow"], progress=False)
    with pytest.raises(DataError, match="one shape"):
        rt.time_runtimes(model, None, batches + input_batches(2, input_shape=SHAPE, pool=1),
                         progress=False)
    with pytest.raises(ConfigError, match="CompiledModel"):
        rt.time_runtimes(model, model, batches, progress=False)


def test_resolve_runtimes_adds_the_baseline_and_keeps_table_order():
    assert rt.resolve_runtimes("all") == list(rt.DENSE_RUNTIMES)
    assert rt.resolve_runtimes(None) == rt.resolve_runtimes("none") == []
    assert rt.resolve_runtimes(["onnxruntime", "eager"]) == ["eager", "onnxruntime"]
    assert rt.resolve_runtimes("none", baseline="openvino") == ["openvino"]
    with pytest.raises(ConfigError, match="unknown runtime"):
        rt.resolve_runtimes(["tensorflow"])
    with pytest.raises(ConfigError, match="baseline"):
        rt.resolve_runtimes("all", baseline="fastest")


def test_speedup_lines_name_the_fastest_each_ratio_and_what_was_skipped():
    def rec(name, ms, kind="dense", available=True, note=""):
        return rt.RuntimeTiming(runtime=name, label=rt.RUNTIMES[name].label if name in rt.RUNTIMES
                                else name, model="m", batch_size=1, kind=kind,
                                available=available, note=note, precision="float32",
                                times_ms=(ms,) if available else (),
                                theoretical_speedup=2.0 if kind != "dense" else None)

    timings = [rec("eager", 20.0), rec("onnxruntime", 10.0),
               rec("openvino", 0, available=False, note="openvino is not installed"),
               rec("ispc", 8.0, kind="ispc")]
    lines = rt.speedup_lines(timings)
    assert lines[0].startswith("ispc, m batch 1: 8.00 ms, 1.25x over the fastest float32 dense "
                               "runtime (ORT 10.00 ms)")
    assert "realized/theoretical 0.62" in lines[0] and "eager 2.50x, ORT 1.25x" in lines[0]
    assert lines[1] == "OpenVINO f32: skipped (openvino is not installed)"
    assert "over the dense runtime (eager 20.00 ms)" in rt.speedup_lines(timings, baseline="eager")[0]
    assert not any("deploy" in line for line in lines)
    slow = rt.speedup_lines([*timings[:3], rec("ispc", 12.0, kind="ispc")])
    assert "0.83x over the fastest" in slow[0]
    assert slow[1].startswith("  ispc is not faster here than dense ORT (12.00 ms vs 10.00 ms): "
                              "deploy the dense model with ONNX Runtime")
    dense = rt.RuntimeTiming(runtime="ispc", label="ispc", model="m", batch_size=1, kind="ispc",
                             available=True, precision="float32", times_ms=(19.0,),
                             theoretical_speedup=1.0)
    assert ("(19.00 ms vs 10.00 ms; its compile left every layer dense, no gate paid on this "
            "machine): deploy" in rt.speedup_lines([*timings[:3], dense])[1])
