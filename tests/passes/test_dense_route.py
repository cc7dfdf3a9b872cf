"""passes/dense_route.py: where no gate pays, the compiled model runs the user's dense model in a
dense runtime; the decision, its figures, the model's outputs and every path around the runtime."""
from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch
from torch import nn

import ispc
from ispc import pipeline
from ispc.native_plan import NativePlanRunner
from conftest import rel_err
from zoo import SmallResidualNet
from ispc import dense_route as route

route_pass = importlib.import_module("ispc.passes.dense_route")  # (the package exports the pass)

pytestmark = pytest.mark.dense_runtimes

INSTALLED = [r for r in route.ROUTE_RUNTIMES if route.installed(r)]
needs_runtime = pytest.mark.skipif(not INSTALLED, reason="no dense runtime installed")


def _data():
    return [torch.randn(8, 3, 16, 16) for _ in range(2)]


def _compile(model=None, **cfg):
    model = SmallResidualNet().eval() if model is None else model
    return model, ispc.compile(model, _data(), config=ispc.GatingConfig(**cfg), progress=False)


@needs_runtime
@pytest.mark.parametrize("runtime", INSTALLED)
def test_keep_1_runs_the_dense_model_in_the_runtime(runtime):
    model, compiled = _compile(keep_ratio=1.0, dense_route=runtime)
    m = route.routed(compiled.graph_module)
    assert isinstance(m, route.DenseRuntimeModule) and m.runtime == runtime
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for n in (1, 3, 5):  # any batch size (OpenVINO: one static-shape request per size)
            x = torch.randn(n, 3, 16, 16)
            assert rel_err(compiled(x), model(x)) < 1e-5
    assert m.__dict__["_session"] is not None or m.__dict__["_requests"]  # the runtime ran
    assert m.spinning is True
    _, stopped = _compile(keep_ratio=1.0, dense_route=runtime, route_spinning=False)
    assert route.routed(stopped.graph_module).spinning is False
    s = compiled.report.summary
    assert s["dense_route"]["runtime"] == runtime and s["layers_gated"] == 0
    assert s["dense_route"]["reason"] == "keep 1.0: no layer gated"
    assert any(n.startswith("dense route: ") and "untimed" in n for n in compiled.report.notes)
    assert all("dense route" in (r.reason or "") for r in compiled.report.layers if r.macs
               and r.op == "conv2d" and r.in_channels >= 16)


@needs_runtime
def test_auto_takes_the_first_installed_untimed():
    _, compiled = _compile(keep_ratio=1.0)
    assert route.routed(compiled.graph_module).runtime == INSTALLED[0]


def test_off_keeps_the_ispc_graph():
    model, compiled = _compile(keep_ratio=1.0, dense_route="off")
    assert route.routed(compiled.graph_module) is None
    assert compiled.report.summary["dense_route"] is None
    assert not any(isinstance(m, route.DenseRuntimeModule) for m in compiled.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


@needs_runtime
def test_gated_model_kept_without_a_measurement():
    _, compiled = _compile(keep_ratio=0.5, mode="topk")
    assert route.routed(compiled.graph_module) is None
    assert compiled.report.summary["layers_gated"] > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_named_runtime_not_installed_is_one_line_error(runtime, monkeypatch):
    monkeypatch.setattr(route, "installed", lambda r: False)
    with pytest.raises(ispc.IspcError, match=f"pip install {runtime}") as err:
        _compile(keep_ratio=1.0, dense_route=runtime)
    assert "\n" not in str(err.value)


def test_auto_without_runtimes_is_silent(monkeypatch):
    monkeypatch.setattr(route, "installed", lambda r: False)
    _, compiled = _compile(keep_ratio=1.0)
    assert route.routed(compiled.graph_module) is None
    assert not any("dense route" in n for n in compiled.report.notes)


def _fake_times(monkeypatch, **ms):
    """Every candidate timed at ``ms`` in each of 5 rounds (the model as built in the clear-win
    probe too); the runtimes' outputs still come from their real sessions, here, for the numerics
    check. The candidates the pass asks for are recorded in ``asked``."""
    asked = []

    def time_runners(runners, x, rounds, **kw):
        (name,) = runners
        runners[name](x)  # the model as built still runs
        return {name: ms[name]}

    def time_candidates(gm, state, onnx, runtimes, x, ref_ms=None):
        asked.append(["ispc", *runtimes])
        out = {"ispc": {"rounds_ms": [ms["ispc"]] * 5, "shares": [1.0] * 5, "ms": ms["ispc"],
                        "output": None, "note": ""}}
        for r in runtimes:
            with torch.no_grad():
                y = route.DenseRuntimeModule(nn.Identity(), r, onnx, tuple(x.shape))(x)
            out[r] = {"rounds_ms": [ms[r]] * 5, "shares": [1.0] * 5, "ms": ms[r],
                      "output": y.numpy(), "note": ""}
        return out

    monkeypatch.setattr(route_pass, "time_runners", time_runners)
    monkeypatch.setattr(route_pass, "time_candidates", time_candidates)
    return asked


@needs_runtime
@pytest.mark.parametrize("ispc_ms, taken", [(10.0, True), (9.6, True), (9.4, False)])
def test_latency_aware_route_against_the_gated_model_as_built(monkeypatch, ispc_ms, taken):
    """The route is taken unless the model as built beats the runtime by ROUTE_MARGIN (figures from
    the timing helper, replaced here: the rule is tested, not this machine's speed). The pass
    runs on a gated graph built with the passes before it."""
    runtime = INSTALLED[0]
    asked = _fake_times(monkeypatch, ispc=ispc_ms, **{runtime: 9.7})
    model = SmallResidualNet().eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", dense_route="off")
    gm, state = pipeline.run(model, _data(), config=cfg, pipeline=pipeline.COMPILE[:-1],
                             progress=False)
    gated = pipeline.build_report(gm, state).summary["layers_gated"]
    assert gated > 0
    state.config = cfg.replace(latency_aware=True, latency_rounds=1, dense_route=runtime)
    out = route_pass.dense_route(gm, state)
    report = pipeline.build_report(out, state)
    m = route.routed(out)
    note = next(n for n in state.notes if n.startswith("dense route"))
    assert f"{ispc_ms:.2f} ms" in note and "9.70 ms" in note
    assert asked == [["ispc", runtime]]  # the model as built timed beside the runtime, alike
    assert f"ispc as built x{ispc_ms / 9.7:.3f}, faster in {5 if ispc_ms < 9.7 else 0} of 5" in note
    if taken:
        assert m is not None and m.decision["times_ms"] == {"ispc": ispc_ms, runtime: 9.7}
        assert m.decision["rounds_ms"] == {"ispc": [ispc_ms] * 5, runtime: [9.7] * 5}
        assert m.decision["reason"] == f"{gated} gated layer(s) do not pay against it"
        assert report.summary["layers_gated"] == 0 and report.summary["dense_route"] == m.decision
        assert len(report.layers) == len(pipeline.build_report(gm, state).layers)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():  # the dense model
            assert rel_err(out(x), model(x)) < 1e-5
    else:
        assert m is None and out is gm and note.startswith("dense route: not taken")
        assert report.summary["layers_gated"] == gated


@needs_runtime
def test_no_gate_left_takes_the_faster_runtime(monkeypatch):
    if len(INSTALLED) < 2:
        pytest.skip("needs both runtimes")
    for ort_ms, ov_ms, want in ((4.0, 3.0, "openvino"), (3.0, 4.0, "onnxruntime"),
                                (3.0, 3.02, "openvino")):  # (near ties go to OpenVINO)
        _fake_times(monkeypatch, ispc=5.0, onnxruntime=ort_ms, openvino=ov_ms)
        _, compiled = _compile(keep_ratio=1.0, latency_aware=True, latency_rounds=1)
        m = route.routed(compiled.graph_module)
        assert m.runtime == want and m.decision["batch_size"] == 1
    _fake_times(monkeypatch, ispc=2.5, onnxruntime=4.0, openvino=3.0)
    _, compiled = _compile(keep_ratio=1.0, latency_aware=True, latency_rounds=1)
    assert route.routed(compiled.graph_module) is None  # never slower than ispc as built


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallResidualNet()

    def forward(self, x):
        y = self.net(x)
        return y, y.sum(1)


@needs_runtime
def test_model_the_route_cannot_run(monkeypatch):
    _, compiled = _compile(TwoOutputs().eval(), keep_ratio=1.0)
    assert route.routed(compiled.graph_module) is None
    assert any("dense route: not considered (the model returns tuple" in n
               for n in compiled.report.notes)
    with pytest.raises(ispc.UnsupportedModelError, match="returns tuple"):
        _compile(TwoOutputs().eval(), keep_ratio=1.0, dense_route=INSTALLED[0])


@needs_runtime
def test_users_model_untouched():
    model = SmallResidualNet().train()
    before = copy.deepcopy(model.state_dict())
    _compile(model, keep_ratio=1.0)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_runtime
def test_paths_around_the_runtime_compute_the_same_model():
    model, compiled = _compile(keep_ratio=1.0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(compiled(x.contiguous(memory_format=torch.channels_last)), ref) < 1e-5
        bigger = torch.randn(2, 3, 24, 24)  # another size than exported: the torch model
        assert rel_err(compiled(bigger), model(bigger)) < 1e-5
    xg = x.clone().requires_grad_()
    y = compiled(xg)  # autograd: the torch model
    assert y.grad_fn is not None and rel_err(y.detach(), ref) < 1e-5
    # export sees the torch model (what saving and ONNX export trace)
    ep = ispc.export.export_program(compiled, (x,))
    assert rel_err(ep.module()(x), ref) < 1e-5
    # copies and pickles hold no session
    for other in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        with torch.no_grad():
            assert rel_err(other(x), ref) < 1e-5
    # measure() sees the layers
    got = compiled.measure([x], progress=False)
    assert got["dense_macs"] > 0 and got["mac_reduction"] == pytest.approx(0.0)
    assert route.routed(compiled.graph_module).use_runtime


@pytest.mark.parametrize("rounds, want", [
    # ONNX Runtime 5% faster in every round
    ({"onnxruntime": [26.0] * 5, "openvino": [27.3] * 5, "ispc": [30.0] * 5}, ("onnxruntime", True)),
    # within RUNTIME_TIE (0.8%): OpenVINO
    ({"onnxruntime": [26.0] * 5, "openvino": [26.2] * 5, "ispc": [30.0] * 5}, ("openvino", True)),
    # faster by 8% in the median ratio but in 2 of 4 rounds only: OpenVINO
    ({"onnxruntime": [20.0, 20.0, 27.0, 27.0], "openvino": [25.0, 25.0, 26.0, 26.0]},
     ("openvino", True)),
    # a busy spell slows every candidate in rounds 2-3 alike: the pairs still order them
    ({"onnxruntime": [27.0, 40.0, 41.0, 27.2, 26.9], "openvino": [26.0, 38.0, 39.5, 26.1, 26.0],
      "ispc": [28.0, 41.0, 44.0, 28.0, 27.5]}, ("openvino", True)),
    ({"onnxruntime": [26.0] * 5, "ispc": [25.6] * 5}, ("onnxruntime", True)),  # within ROUTE_MARGIN
    ({"openvino": [26.0] * 5, "ispc": [25.0] * 5}, ("openvino", False)),  # ispc faster by 3.8%
    # ispc 10% faster in the median ratio but in 2 of 4 rounds only: the route
    ({"openvino": [26.0] * 4, "ispc": [20.0, 20.0, 27.0, 27.0]}, ("openvino", True)),
    ({"openvino": [26.0] * 5}, ("openvino", True)),  # the model as built not timed
])
def test_choose_from_paired_rounds(rounds, want):
    assert route_pass.choose(rounds) == want


@pytest.mark.parametrize("rounds, want", [
    ({"openvino": [26.0] * 9, "onnxruntime": [27.3] * 9, "ispc": [30.0] * 9}, True),
    ({"openvino": [26.0] * 9, "onnxruntime": [26.1] * 9, "ispc": [30.0] * 9}, False),  # a tie
    # ORT 1.9% faster: OpenVINO x1.020 against it, 3% from the tie
    ({"openvino": [26.0] * 9, "onnxruntime": [25.5] * 9}, True),
    ({"openvino": [26.0] * 9, "ispc": [25.5] * 9}, False),  # ispc 1.9% faster: near 2%
    ({"openvino": [26.0] * 9, "ispc": [24.0] * 9}, True),  # ispc 7.7% faster
    ({"ispc": [24.0] * 9}, True),  # every runtime's worker failed: nothing to decide
])
def test_settled_asks_for_rounds_near_a_threshold(rounds, want):
    assert route_pass.settled(rounds) is want


def test_quiet_rounds_leave_out_a_busy_block():
    shares = {"ispc": [0.95, 0.97, 0.5, 0.96, 0.94], "openvino": [0.9, 0.92, 0.91, 0.6, 0.9]}
    assert route_pass.quiet_rounds(shares) == [0, 1, 4]
    assert route_pass.quiet_rounds({"a": [], "b": []}) == []
    # a slow spell: the model as built's worker far above its time in the compiling process
    rounds = {"ispc": [4.8, 5.5, 4.9, 5.6, 4.7], "openvino": [4.0, 6.3, 4.1, 6.4, 4.0]}
    ones = {k: [1.0] * 5 for k in rounds}
    assert route_pass.quiet_rounds(ones, rounds, 4.8) == [0, 2, 4]
    assert route_pass.quiet_rounds(ones, rounds) == [0, 1, 2, 3, 4]


@needs_runtime
def test_candidates_timed_alike_in_workers():
    """The model as built (pickled, the eager backend's runner attached in the worker) and each
    runtime through the route's module: the same worker path, the same rounds, and outputs that
    match the model."""
    model = SmallResidualNet().eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", dense_route="off")
    gm, state = pipeline.run(model, _data(), config=cfg, pipeline=pipeline.COMPILE[:-1],
                             progress=False)
    x = torch.randn(1, 3, 16, 16)
    onnx = route.onnx_bytes(model, torch.randn(2, 3, 16, 16))
    res = route_pass.time_candidates(gm, state, onnx, INSTALLED, x)
    assert sorted(res) == sorted(["ispc", *INSTALLED])
    least, most = route_pass.ROUNDS[0]
    for name, r in res.items():
        assert r["note"] == "" and r["ms"] > 0, (name, r["note"])
        assert least <= len(r["rounds_ms"]) == len(res["ispc"]["rounds_ms"]) <= most
    with torch.no_grad():
        for r in INSTALLED:
            assert rel_err(torch.from_numpy(res[r]["output"]), model(x)) < 1e-5
        assert rel_err(torch.from_numpy(res["ispc"]["output"]), NativePlanRunner(gm)(x)) < 1e-5


def test_gated_savings_from_the_layers_own_timings():
    from torch import fx
    from ispc.records import GateDecision, KernelChoice, records

    g = fx.Graph()
    nodes = [g.placeholder(f"x{i}") for i in range(4)]
    for n, (t, bs) in zip(nodes, [({"dense": 3.0, "pix": 1.0, "co": 1.5}, 1),
                                  ({"dense": 2.0, "pix": 2.5}, 1),  # slower gated: saves 0
                                  ({"dense": 9.0, "pix": 1.0}, 32),  # timed at another batch
                                  (None, 1)]):
        records(n).gate = GateDecision(gated=True)
        records(n).kernel = KernelChoice(strategy="pix", times_ms=t, batch_size=bs)
    assert route_pass.gated_savings_ms(nodes, 1) == pytest.approx(2.0)
    assert route_pass.gated_savings_ms(nodes, 32) == pytest.approx(8.0)


@needs_runtime
def test_clearly_faster_gated_model_is_not_exported(monkeypatch):
    """Where the gated layers' savings put every dense runtime out of reach (DENSE_EDGE), the
    route is not considered: no export, no runtime timed, a note with the figures."""
    _fake_times(monkeypatch, ispc=10.0)
    monkeypatch.setattr(route_pass, "gated_savings_ms", lambda nodes, bs: 4.0)  # 14 > 10 * 1.03 * 1.25
    monkeypatch.setattr(route, "onnx_bytes", lambda *a: pytest.fail("exported"))
    model = SmallResidualNet().eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", dense_route="off")
    gm, state = pipeline.run(model, _data(), config=cfg, pipeline=pipeline.COMPILE[:-1],
                             progress=False)
    assert pipeline.build_report(gm, state).summary["layers_gated"] > 0
    state.config = cfg.replace(latency_aware=True, latency_rounds=1, dense_route="auto")
    assert route_pass.dense_route(gm, state) is gm
    note = next(n for n in state.notes if n.startswith("dense route"))
    assert note.startswith("dense route: not considered, ispc as built is clearly faster (10.00 ms")
    assert "save 4.00 ms" in note
