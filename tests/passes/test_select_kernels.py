"""select_kernels: predicted kernels by shape; measured mode un-gates layers that do not pay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err
from ispc.examples.models import resnet20
from ispc.ops import native
from ispc.passes import kernel_costs, layout_converters
from ispc.passes.kernel_costs import CL_MIN_CHANNELS, ORIENT_NAMES
from ispc.passes.select_kernels import (DENSE_ROUTE_NOTE, KEEPS_EVERY_CHANNEL, LAYOUT_MARGIN,
                                        LAYOUT_PROBE_RATIO)
from ispc.records import records


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize("with_native", [True, False])
def test_predicted_strategies_follow_shape(with_native, monkeypatch):
    if with_native and not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    if not with_native:
        monkeypatch.setattr(native, "available", lambda: False)
    c = ispc.compile(resnet20().eval(), _data(), progress=False)
    seen = set()
    for n in c.graph_module.graph.nodes:
        kernel = records(n).kernel
        if kernel:
            mod = c.graph_module.get_submodule(n.target)
            hw = n.meta["tensor_meta"].shape[-1] * n.meta["tensor_meta"].shape[-2]
            assert kernel.cost_model == "predicted"
            if with_native:
                expect = "native"
                orient = native.ORIENT_CO if hw <= native.SMALL_MAP else native.ORIENT_PIX
                if mod.weight.shape[-1] > 1 and (mod.in_channels >= CL_MIN_CHANNELS
                                                 or hw <= native.SMALL_MAP):
                    orient = native.ORIENT_CL
                assert mod.orient == orient and kernel.orient == ORIENT_NAMES[orient]
                seen.add(orient)
            else:
                expect = "gemm" if hw <= 196 or mod.weight.shape[-1] == 1 else "gather"
            assert mod.strategy == kernel.strategy == expect
            row = c.report.layer(n.target)
            assert row.cpu_kernel == expect + (f":{ORIENT_NAMES[mod.orient]}" if with_native else "")
    if with_native:  # ResNet-20 at 32x32: 16-channel 32x32 layers, wider 3x3 ones on smaller
        # maps and 1x1 shortcuts on 16x16 and 8x8
        assert seen == {native.ORIENT_PIX, native.ORIENT_CL, native.ORIENT_CO}


def test_latency_aware_ungates_with_reason_and_stays_exact():
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.999, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    # no kernel can save 99.9% of a layer's time: every layer must be left dense, with its timing
    assert c.report.summary["layers_gated"] == 0
    reasons = [r.reason for r in c.report.layers if r.cv is not None]
    assert reasons and all(r.startswith("no measured gain at batch 1") for r in reasons)
    assert not c.gated_modules()
    assert all(isinstance(m, nn.Conv2d) for m in c.graph_module.modules() if hasattr(m, "weight")
               and getattr(m, "weight").dim() == 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-4
    assert c.report.summary["expected_macs"] == c.report.summary["dense_macs"]


def test_latency_aware_keeps_gated_layers_exact():
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    for name, mod in c.gated_modules().items():
        assert mod.strategy in ("gather", "grouped", "gemm", "native", "nhwc")
    assert all(e <= 1e-5 for e in _gated_errors(c))


def _gated_errors(c: ispc.CompiledModel) -> list[float]:
    """Each gated layer's relative error against its masked-dense reference on a random input."""
    errs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: errs.append(rel_err(o, mod.reference(*a))))
             for m in c.gated_modules().values()]
    with torch.no_grad():
        c(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    return errs


def test_latency_aware_times_kernels_at_the_refined_thresholds(monkeypatch):
    """Thresholds chosen on the dense model cut far more once upstream layers are gated; kernels
    timed at those counts were wrong for the refined model (MobileNetV2 ran 0.84x of dense). So
    selection must see the thresholds the compiled model keeps."""

    from ispc.pipeline import COMPILE as COMPILE_PIPELINE

    sk = kernel_costs

    assert COMPILE_PIPELINE.index("refine") < COMPILE_PIPELINE.index("select_kernels")
    seen: dict[str, float] = {}
    real = sk.candidates

    def spy(mod, input_hw=None, **kw):
        seen[id(mod)] = float(mod.threshold)
        return real(mod, input_hw, **kw)

    monkeypatch.setattr(sk, "candidates", spy)
    # every kernel "beats" dense, so every layer stays gated and the graph is not refined again
    monkeypatch.setattr(sk, "time_candidates", lambda fns, rounds, **kw: {k: 2.0 if k.startswith("dense") else 1.0
                                                               for k in fns})
    cfg = ispc.GatingConfig(mode="threshold", latency_aware=True, latency_rounds=1)
    c = ispc.compile(resnet20().eval(), _data(), progress=False, config=cfg)
    gated = c.gated_modules()
    assert gated and seen
    # no second refinement: selection saw the final values
    assert all(seen[id(m)] == float(m.threshold) for m in gated.values())
    assert sum("thresholds refined" in n for n in c.report.notes) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gating_on_cuda_warns_unless_latency_aware():
    from ispc.examples import models as M

    model = M.resnet20(num_classes=10).eval().cuda()
    data = [torch.randn(16, 3, 32, 32, device="cuda")]
    with pytest.warns(UserWarning, match="latency_aware=True"):
        ispc.compile(model, data, progress=False)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ispc.compile(model, data, progress=False,
                     config=ispc.GatingConfig(latency_aware=True, latency_rounds=3))
    assert not any("latency_aware=True" in str(w.message) for w in seen)


def _layer_times(monkeypatch, sk):
    """Fake per-layer timings: every kernel pays (0.5 ms against dense 1.0), and on a
    channels-last input more (0.4): the layers run the real kernels' layouts through a spy."""
    seen = {}

    def spy(strategy, x, *args):
        seen["nhwc"] = native.is_channels_last(x)

    monkeypatch.setattr(sk, "run_strategy", spy)
    # the channels-last kernels are timed inside a program (kernel_costs.in_program)
    monkeypatch.setattr(sk, "in_program", lambda kernel, x, *a: lambda: spy("nhwc", x))

    def times(fns):
        if set(fns) == {"nhwc", "nchw"}:  # a layer's choices for both layouts, side by side
            return {"nhwc": 0.4, "nchw": 0.5}
        next(fn for k, fn in fns.items() if k != "dense")()
        return {k: 1.0 if k == "dense" else 0.4 if seen["nhwc"] else 0.5 for k in fns}

    return times


@pytest.mark.parametrize("gated_ms, kept", [(2.0, False), (0.5, True)])
@pytest.mark.parametrize("layout", [False, None])
def test_whole_model_check_keeps_gates_only_when_the_gated_model_is_faster(monkeypatch, gated_ms,
                                                                           kept, layout):

    sk = kernel_costs
    calls = []
    layer_times = _layer_times(monkeypatch, sk)

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:  # the whole-model check: every configuration runs
            for label, fn in fns.items():
                fn()
                calls.append(label)
            return {"gated": gated_ms, "gated_nchw": gated_ms * 1.5, "dense": 1.0,
                    "dense_nhwc": 1.2}
        return layer_times(fns)  # every layer pays alone

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3, channels_last=layout)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    # a layout left to measurement (None): gated and dense are each timed in both layouts
    assert sorted(calls) == (["dense", "gated"] if layout is False
                             else ["dense", "dense_nhwc", "gated", "gated_nchw"])
    assert (c.report.summary["layers_gated"] > 0) == kept
    assert bool(c.gated_modules()) == kept
    assert any(("every gate was removed" in n) != kept for n in c.report.notes
               if n.startswith("whole-model check"))
    # where it comes back dense, the report says where to look for the fastest dense runtime
    assert any("ispc bench MODEL --runtimes" in n for n in c.report.notes) != kept
    converters = layout_converters(c.graph_module)
    assert bool(converters) == (layout is None)
    # channels-last measured faster (gated_ms < 1.5 * gated_ms) is kept; dense, NCHW (1.0 < 1.2)
    assert all(m.enabled == kept for m in converters)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
    assert out.is_contiguous()
    if not kept:
        assert rel_err(out, model(x)) <= 1e-4


@pytest.mark.parametrize("nhwc_ms, nchw_ms", [(0.5, 0.6), (0.6, 0.5), (0.5, 0.503)])
def test_whole_model_check_keeps_the_faster_layout(monkeypatch, nhwc_ms, nchw_ms):
    """Channels-last is kept only where it measured faster than NCHW by more than the margin."""

    sk = kernel_costs
    nhwc = nhwc_ms < nchw_ms * (1.0 - LAYOUT_MARGIN)
    assert nhwc == (nchw_ms == 0.6)

    layer_times = _layer_times(monkeypatch, sk)

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:
            for fn in fns.values():
                fn()
            return {"gated": nhwc_ms, "gated_nchw": nchw_ms, "dense": 1.0, "dense_nhwc": 1.1}
        return layer_times(fns)

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    assert c.gated_modules()
    converters = layout_converters(c.graph_module)
    assert len(converters) == 2 and all(m.enabled == nhwc for m in converters)
    assert any(n.endswith("; gated, channels-last" if nhwc else "; gated, NCHW")
               for n in c.report.notes)
    _assert_layout_changes_no_value(c, converters)


def _assert_layout_changes_no_value(c: ispc.CompiledModel, converters: list) -> None:
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
        for m in converters:
            m.enabled = not m.enabled
        assert rel_err(c(x), out) <= 1e-5


def test_channels_last_is_not_timed_whole_where_its_layers_are_no_faster(monkeypatch):
    """Where the layers that read channels-last maps measured no faster in sum than on NCHW maps,
    the gated model stays NCHW and is timed so only (the dense one still in both layouts)."""

    sk = kernel_costs
    calls = []

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:
            calls.extend(fns)
            return {"gated": 0.5, "gated_nchw": 0.1, "dense": 1.0, "dense_nhwc": 1.1}
        return {k: 1.0 if k == "dense" else 0.5 for k in fns}  # the same in both layouts

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    c = ispc.compile(resnet20().eval(), _data(), progress=False,
                     config=ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3))
    assert sorted(calls) == ["dense", "dense_nhwc", "gated"]
    assert c.gated_modules() and not any(m.enabled for m in layout_converters(c.graph_module))
    assert any("on NCHW maps; the maps stay NCHW" in n for n in c.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
    assert out.is_contiguous() and out.shape == (2, 10)


@pytest.mark.parametrize("nchw_ratio", [LAYOUT_PROBE_RATIO * 1.05, LAYOUT_PROBE_RATIO * 0.95])
def test_nchw_kernels_are_timed_only_where_nchw_maps_could_win(monkeypatch, nchw_ratio):
    """The whole gated model on NCHW maps with the predicted kernels, as built, measured
    LAYOUT_PROBE_RATIO times as slow as channels-last or more: no NCHW kernel is timed (per layer,
    in sums, or whole) and the model stays gated, channels-last; under it, both layouts are timed
    as before."""

    sk = kernel_costs
    layouts, calls, probed = [], [], []
    layer_times = _layer_times(monkeypatch, sk)

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "model_nchw" in fns:  # the probe: two runners of the model as built, run for real
            for fn in fns.values():
                fn()
            probed.append(sorted(fns))
            return {"model_channels_last": 1.0, "model_nchw": nchw_ratio}
        if "gated" in fns:
            calls.extend(fns)
            return {k: 0.5 if k.startswith("gated") else 1.0 for k in fns}
        if set(fns) == {"nhwc", "nchw"}:
            layouts.append(1)
        return layer_times(fns)

    measured = []
    real = sk.measure
    monkeypatch.setattr(sk, "measure", lambda mod, xin, *a, **kw: (
        measured.append(native.is_channels_last(xin)), real(mod, xin, *a, **kw))[1])
    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3))
    assert probed == [["model_channels_last", "model_nchw"]]
    skipped = nchw_ratio >= LAYOUT_PROBE_RATIO
    assert all(measured) == skipped and bool(layouts) != skipped
    assert ("gated_nchw" in calls) != skipped
    assert any("the NCHW kernels were not timed" in n for n in c.report.notes) == skipped
    converters = layout_converters(c.graph_module)
    assert c.gated_modules() and converters
    assert all(m.enabled for m in converters) or not skipped  # else layer_times' sums decide
    _assert_layout_changes_no_value(c, converters)


@pytest.mark.parametrize("all_ms, regate", [(0.4, True), (0.6, False)])
def test_whole_model_check_gates_again_the_layers_per_layer_timing_left_dense(monkeypatch, all_ms,
                                                                            regate):
    """On channels-last maps the whole model with every layer gated (those left dense per layer
    on their predicted kernel) is timed too, and taken where faster: those layers are gated again,
    with their gates and a whole-model record, and run exactly; else they stay dense."""

    sk = kernel_costs
    calls = []
    layer = iter(range(10_000))

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:
            calls.extend(fns)
            for fn in fns.values():
                fn()
            return {"gated": 0.5, "gated_all": all_ms, "dense": 1.0, "dense_nhwc": 1.0}
        if "model_nchw" in fns:
            return {"model_channels_last": 1.0, "model_nchw": 2.0}
        if "dense" in fns and next(layer) % 3 == 0:  # every third layer timed: dense is faster
            return {k: 0.5 if k == "dense" else 1.0 for k in fns}
        return {k: 1.0 if k == "dense" else 0.5 for k in fns}

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    gated = set(ispc.compile(model, _data(), progress=False).gated_modules())
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3))
    assert sorted(calls) == ["dense", "dense_nhwc", "gated", "gated_all"]
    now = set(c.gated_modules())
    left = [r for r in c.report.layers if r.reason and r.reason.startswith("no measured gain")]
    assert (now == gated) == regate and (not left) == regate
    assert now <= gated and all(r.name in gated - now for r in left)
    whole = {n.target for n in c.graph_module.graph.nodes if records(n).kernel is not None
             and records(n).kernel.cost_model == "measured_whole_model"}
    assert bool(whole) == regate and whole <= now
    assert all(records(n).gate.gated for n in c.graph_module.graph.nodes if n.target in whole)
    assert any(("gated too" if regate else "stay dense") in n for n in c.report.notes)
    errs = _gated_errors(c)
    assert len(errs) == len(now) and all(e <= 1e-5 for e in errs)


def test_a_dense_model_faster_channels_last_comes_back_dense_and_channels_last(monkeypatch):
    """The compiled model is never slower than the dense one in either layout: where dense
    channels-last beats every gated configuration, every gate goes and the maps run NHWC."""

    sk = kernel_costs
    layer_times = _layer_times(monkeypatch, sk)

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:
            for fn in fns.values():
                fn()
            return {"gated": 0.8, "gated_nchw": 0.9, "dense": 1.0, "dense_nhwc": 0.6}
        return layer_times(fns)

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3))
    assert not c.gated_modules() and c.report.summary["layers_gated"] == 0
    assert all(m.enabled for m in layout_converters(c.graph_module))
    assert any("; dense, channels-last. " in n for n in c.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
    assert out.is_contiguous() and rel_err(out, model(x)) <= 1e-4


@pytest.mark.parametrize("nhwc_ms, channels_last", [(0.6, True), (0.995, False)])
def test_a_model_left_all_dense_runs_in_the_faster_layout(monkeypatch, nhwc_ms, channels_last):
    """Every layer left dense per layer (keep 1.0) and the NCHW kernels not timed: the dense model
    as built is still timed in both layouts and runs channels-last only where that is faster by
    LAYOUT_MARGIN (it had fallen back to NCHW maps, 1.4-1.8x slower on the ResNets)."""

    sk = kernel_costs
    checked = []

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if set(fns) == {"dense", "dense_nhwc"}:
            for fn in fns.values():  # the models as built, run for real
                fn()
            checked.append(1)
            return {"dense": 1.0, "dense_nhwc": nhwc_ms}
        if "model_nchw" in fns:
            return {"model_channels_last": 1.0, "model_nchw": 2.0}
        return {k: 0.5 if k == "dense" else 1.0 for k in fns}  # per layer: dense is faster

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    model = resnet20().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(keep_ratio=1.0, latency_aware=True, latency_rounds=3))
    assert checked == [1] and not c.gated_modules()
    converters = layout_converters(c.graph_module)
    assert converters and all(m.enabled == channels_last for m in converters)
    layout = "channels-last" if channels_last else "NCHW"
    assert any(n.startswith("whole-model check") and "no layer gated" in n
               and n.endswith(f"; {layout}. {DENSE_ROUTE_NOTE}") for n in c.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-4


def test_gates_that_keep_every_channel_are_left_dense_untimed(monkeypatch):
    # keep_ratio=1.0, top-k: no layer can skip a MAC, so no layer's kernels are timed (a ResNet-50
    # compile for batch 32 spent ~30 s on them) and every layer is left dense with the reason
    timed = []
    real = kernel_costs.time_candidates

    def spy(fns, rounds, **kw):
        timed.append(set(fns))
        return real(fns, 1, **kw)

    monkeypatch.setattr(kernel_costs, "time_candidates", spy)
    model = resnet20().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(keep_ratio=1.0, mode="topk", latency_aware=True,
                                              latency_rounds=3, dense_route="off"))
    assert not c.gated_modules()
    reasons = {records(n).gate.reason for n in c.graph_module.graph.nodes
               if records(n).gate is not None and records(n).gate.cv is not None}
    assert reasons == {KEEPS_EVERY_CHANNEL}
    # the per-layer timings put "dense" beside the layer's kernels; only the dense model's layout
    # check (and the passes before, which time ungated layers) ran
    assert {"dense", "dense_nhwc"} in timed
    assert not any("dense" in labels and labels != {"dense", "dense_nhwc"} for labels in timed), timed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-4


@pytest.mark.parametrize("factor, keeps_predicted", [(1.02, True), (1.10, False)])
def test_measured_selection_keeps_the_predicted_kernel_within_the_margin(monkeypatch, factor,
                                                                         keeps_predicted):

    from ispc.passes.kernel_costs import PREDICTED_MARGIN

    if not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    assert 1.02 < 1.0 + PREDICTED_MARGIN < 1.10
    sk = kernel_costs
    fast = "native:co"  # a candidate of every layer: measured `factor` times faster than the rest

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:  # the whole-model check: gated wins, in either layout
            return {k: 0.5 if k.startswith("gated") else 1.0 for k in fns}
        times = {k: 0.5 for k in fns}
        times.update(dense=1.0, **{fast: 0.5 / factor})
        return times

    model = resnet20().eval()
    plain = ispc.compile(model, _data(), progress=False)  # the predicted kernels
    predicted = {name: plain.report.layer(name).cpu_kernel for name in plain.gated_modules()}
    monkeypatch.setattr(sk, "time_candidates", fake_time)
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    assert set(c.gated_modules()) == set(predicted)
    assert any(k != fast for k in predicted.values())
    for name in predicted:
        chosen = c.report.layer(name).cpu_kernel
        assert chosen == (predicted[name] if keeps_predicted else fast), name


def test_layers_of_one_geometry_are_timed_once(monkeypatch):
    """ResNet-20's repeated blocks: one timing per layer geometry (kernel_costs.geometry), every
    layer of it given that measurement's kernel, each with its own dense layer."""
    sk = kernel_costs
    timed = []

    def fake_time(fns, rounds, **kw):
        if "dense" in fns and "gated" not in fns:  # a layer's kernels, not the whole-model check
            timed.append(1)
        return {k: 2.0 if k.startswith("dense") else 1.0 for k in fns}

    monkeypatch.setattr(sk, "time_candidates", fake_time)
    cfg = ispc.GatingConfig(mode="topk", keep_ratio=0.5, latency_aware=True, latency_rounds=1,
                            channels_last=False)
    c = ispc.compile(resnet20().eval(), _data(), progress=False, config=cfg)
    gated = c.gated_modules()
    geometries = {(tuple(m.weight.shape), m._args) for m in gated.values()}
    assert len(timed) == len(geometries) < len(gated)
    kernels = {}
    for node in c.graph_module.graph.nodes:
        rec = records(node)
        if node.op == "call_module" and node.target in gated:
            m = gated[node.target]
            key = (tuple(m.weight.shape), m._args)
            kernels.setdefault(key, rec.kernel.times_ms)
            assert rec.kernel.cost_model == "measured" and rec.kernel.times_ms
    # every gated layer runs its own weights, not its geometry twin's
    assert len({m.weight.data_ptr() for m in gated.values()}) == len(gated)
    # with threshold gates (a threshold per layer) no two layers share a measurement
    timed.clear()
    c = ispc.compile(resnet20().eval(), _data(), progress=False,
                     config=ispc.GatingConfig(latency_aware=True, latency_rounds=1,
                                              channels_last=False))
    assert len(timed) == len(c.gated_modules())


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_channels_last_models_run_the_nhwc_kernel_exactly_and_keep_it_through_save(tmp_path, mode):
    """On channels-last maps the predicted kernel is nhwc (weights packed once, for the layer's
    output size); every layer equals its masked-dense reference, fused epilogues included; with
    every channel kept the model equals the original; ispc.save/load keeps the kernel."""
    model = resnet20().eval()
    x = torch.randn(3, 3, 32, 32)
    for keep in (0.5, 1.0):
        cfg = ispc.GatingConfig(keep_ratio=keep, mode=mode, channels_last=True)
        c = ispc.compile(model, _data(), progress=False, config=cfg)
        gated = c.gated_modules()
        assert gated and all(m.strategy == "nhwc" and m.out_hw for m in gated.values())
        nodes = {n.target: n for n in c.graph_module.graph.nodes if n.op == "call_module"}
        for name, m in gated.items():
            shape = nodes[name].meta["tensor_meta"].shape
            assert m.out_hw == shape[-1] * shape[-2] and records(nodes[name]).kernel.strategy == "nhwc"
        if keep == 1.0:
            with torch.no_grad():
                assert rel_err(c(x), model(x)) <= 1e-5
            continue
        assert any(m.act or m.residual_add for m in gated.values())  # fused epilogues ran
        errs = []
        hooks = [m.register_forward_hook(
            lambda mod, a, o: errs.append((rel_err(o, mod.reference(*a)),
                                           o.is_contiguous(memory_format=torch.channels_last))))
            for m in gated.values()]
        with torch.no_grad():
            want = c(x)
        for h in hooks:
            h.remove()
        assert len(errs) == len(gated) and all(e <= 1e-5 and cl for e, cl in errs)
        ispc.save(c, tmp_path / "m.ispc")
        loaded = ispc.load(tmp_path / "m.ispc")
        back = loaded.gated_modules()
        assert {n: (m.strategy, m.out_hw) for n, m in back.items()} == {
            n: (m.strategy, m.out_hw) for n, m in gated.items()}
        with torch.no_grad():
            assert rel_err(loaded(x), want) <= 1e-5


@pytest.mark.parametrize("factor, keeps_nhwc", [(1.10, True), (1.25, False)])
def test_gather_must_beat_the_program_kernel_by_the_program_margin(monkeypatch, factor, keeps_nhwc):
    """On channels-last maps ``gather`` runs outside the runner's program (splitting it): a few
    percent measured in its favour leave the layer on ``nhwc``, more than PROGRAM_MARGIN do not."""
    from ispc.passes.kernel_costs import PROGRAM_MARGIN

    if not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    assert 1.10 < 1.0 + PROGRAM_MARGIN < 1.25

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:  # the whole-model check: the measured kernels win clearly
            return {k: 0.4 if k == "gated" else 0.5 if k.startswith("gated") else 1.0 for k in fns}
        return {k: 1.0 if k == "dense" else 0.5 / factor if k == "gather" else 0.5 for k in fns}

    monkeypatch.setattr(kernel_costs, "time_candidates", fake_time)
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3, channels_last=True)
    c = ispc.compile(resnet20().eval(), _data(), progress=False, config=cfg)
    # (nhwc labels may name the algorithm a 3x3 layer's timing chose: nhwc:winograd / :direct)
    kernels = {c.report.layer(name).cpu_kernel.split(":")[0] for name in c.gated_modules()}
    assert kernels == ({"nhwc"} if keeps_nhwc else {"gather"})


@pytest.mark.parametrize("program_ms, back", [(0.5, True), (0.51, True), (0.6, False)])
def test_whole_model_check_puts_layers_off_the_program_back_on_nhwc(monkeypatch, program_ms, back):
    """Layers measured per layer on ``gather`` on channels-last maps (a slow spell during the
    predicted kernel's timing) run ``nhwc`` again unless the whole model measured faster with them
    on ``gather`` by PROGRAM_WHOLE_MARGIN: the layers back carry a whole-model record, run
    exactly, and the note says it."""
    from ispc.passes.select_kernels import PROGRAM_WHOLE_MARGIN

    if not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    assert 0.51 * (1.0 - PROGRAM_WHOLE_MARGIN) <= 0.5 < 0.6 * (1.0 - PROGRAM_WHOLE_MARGIN)
    calls = []

    def fake_time(fns, rounds, *, cuda=False, **kw):
        if "gated" in fns:
            calls.extend(fns)
            for fn in fns.values():
                fn()
            return {k: 0.5 if k == "gated" else program_ms if k == "gated_program" else 1.0
                    for k in fns}
        return {k: 1.0 if k == "dense" else 0.25 if k == "gather" else 0.5 for k in fns}

    monkeypatch.setattr(kernel_costs, "time_candidates", fake_time)
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3, channels_last=True)
    c = ispc.compile(resnet20().eval(), _data(), progress=False, config=cfg)
    assert sorted(calls) == ["dense", "gated", "gated_program"]
    gated = c.gated_modules()
    assert gated and {m.strategy for m in gated.values()} == ({"nhwc"} if back else {"gather"})
    whole = {n.target for n in c.graph_module.graph.nodes if records(n).kernel is not None
             and records(n).kernel.cost_model == "measured_whole_model"}
    assert whole == (set(gated) if back else set())
    assert all(records(n).kernel.input_layout == "channels_last" and records(n).gate.gated
               for n in c.graph_module.graph.nodes if n.target in whole)
    assert any(n.startswith("whole-model check") and "off the native program (gather) "
               + ("run nhwc" if back else "stay on them") in n for n in c.report.notes)
    errs = _gated_errors(c)
    assert len(errs) == len(gated) and all(e <= 1e-5 for e in errs)
