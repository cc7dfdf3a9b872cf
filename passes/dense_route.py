"""Pass: run the dense model in the fastest installed dense runtime where no gate pays.

Last in ``ispc.compile`` (the model as built is what it compares). Taken (``GatingConfig.
dense_route="auto"``) where no layer is left gated (``keep_ratio=1.0``, or the latency-aware checks
removed every gate), and with ``latency_aware`` where the fastest installed runtime (ONNX Runtime,
OpenVINO f32) is not slower than the model as built by more than :data:`ROUTE_MARGIN` (ties go to
the runtime): the model as built timed here at ``latency_batch_size``, each runtime in processes of
its own (:func:`ispc.dense_route.time_apart`: in this process their order was not theirs alone).
Where the gated layers' own timings show the model as built clearly faster than any dense runtime
could be (:data:`DENSE_EDGE`), nothing is exported or timed. The graph then calls one
:class:`~ispc.dense_route.DenseRuntimeModule` holding the user's model exported to ONNX; the
report's notes and summary give the figures. The gated graph it replaces stays readable by the
report (its nodes and records, without modules: ``DenseRuntimeModule.as_built``).
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from ispc import dense_route as route
from ispc.errors import UnsupportedModelError
from ispc.native_plan import NativePlanRunner

from .base import PassState, records, register_pass
from .kernel_costs import time_runners, timing_input
from .select_kernels import WHOLE_MODEL_BUDGET_S

__all__ = ["dense_route", "choose", "gated_savings_ms", "ROUTE_MARGIN", "RUNTIME_TIE", "DENSE_EDGE",
           "APART_ROUNDS", "LABELS"]

#: the route is taken unless the model as built runs faster than the runtime by more than this
#: fraction: ties go to the dense runtime ("never slower than the best dense runtime"). It covers
#: the bias between the model as built, timed in the compiling process, and the same model in a
#: process of its own as the benchmark times it: within 2% (MobileNetV2, ResNet-18/50 at batch 1,
#: 2-core Xeon, docs/dense_route.md). The runtimes, timed in processes of their own, vary more
#: (+-5% between compiles): :data:`APART_ROUNDS` answers that. 10% while the runtimes too were
#: timed in the compiling process, where they read up to 7% slow
ROUTE_MARGIN = 0.03
#: ONNX Runtime is preferred to OpenVINO only where it timed faster by more than this fraction.
#: The route on OpenVINO ran as fast as OpenVINO alone in a process of the model's own (MobileNetV2
#: 3.19 against 3.20 ms, ResNet-50 27.92 against 27.71); on ONNX Runtime, which stops its workers'
#: spinning after each call, as fast as ONNX Runtime alone on ResNet-50 (28.53 against 28.65) but
#: 8% slower on MobileNetV2 (3.46 against 3.20), where the compile-time timing showed a tie
RUNTIME_TIE = 0.015
#: the fastest dense runtime ran up to 1.14x faster than ispc's own dense kernels (ResNet-50 at
#: batch 1, release 0.6.0: 0.88x); where the gated layers' measured savings make ispc's dense model
#: slower than the model as built by more than this (times 1 + ROUTE_MARGIN), no dense runtime can
#: win and the route is not considered (no export, no runtime timed)
DENSE_EDGE = 1.25
#: processes per runtime, rotated, in which the runtimes are timed apart (time_apart): with 2,
#: OpenVINO on MobileNetV2 read 2.94 and 3.31 ms in two compiles
APART_ROUNDS = 3
#: the runtimes' names for people
LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO f32"}
#: the route's output must match the user's model this closely (max |diff| / max |ref|)
MAX_REL_ERR = 1e-4


def _unsupported(gm: fx.GraphModule, state: PassState) -> str | None:
    """Why the route cannot run this model, from the graph and the example (None: it may)."""
    if not state.example_inputs:
        return "compiled without calibration data: no input to export the model with"
    x = state.example_inputs[0]
    if state.input_name is not None or sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return "the model takes its input by keyword or several inputs"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"the model runs on {x.device.type} in {x.dtype} (the route is CPU float32)"
    return None


def _not_considered(gm: fx.GraphModule, state: PassState, why: str) -> fx.GraphModule:
    """``gm`` unchanged, with a note (auto); a one-line error where a runtime was named."""
    cfg = state.config
    if cfg.dense_route != "auto":
        raise UnsupportedModelError(f"GatingConfig(dense_route={cfg.dense_route!r}): {why}; use "
                                    "dense_route='auto' or 'off'")
    state.notes.append(f"dense route: not considered ({why})")
    return gm


def choose(times_ms: dict[str, float], ispc_ms: float) -> tuple[str, bool]:
    """The runtime the route takes from its timings (ms; ``times_ms`` not empty): the fastest,
    OpenVINO where ONNX Runtime is not faster by :data:`RUNTIME_TIE`; and whether the route is
    taken (it is not slower than ``ispc_ms``, the model as built, by :data:`ROUTE_MARGIN`)."""
    best = min(times_ms, key=times_ms.__getitem__)
    if best == "onnxruntime" and times_ms.get("openvino", float("inf")) <= times_ms[best] * (
            1.0 + RUNTIME_TIE):
        best = "openvino"
    return best, times_ms[best] < ispc_ms * (1.0 + ROUTE_MARGIN)


def gated_savings_ms(nodes: list[fx.Node], batch_size: int) -> float:
    """What the gated layers ``nodes`` save per call against ispc's own dense kernels, from their
    per-layer timings at ``batch_size`` (select_kernels): each layer's dense time less its
    fastest gated kernel's. 0 where a layer was not timed there."""
    saved = 0.0
    for n in nodes:
        k = records(n).kernel
        t = (k.times_ms or {}) if k is not None and k.batch_size == batch_size else {}
        gated = [v for name, v in t.items() if name != "dense"]
        if "dense" in t and gated:
            saved += max(0.0, t["dense"] - min(gated))
    return saved


@register_pass("dense_route")
def dense_route(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Replace the graph by one call of the dense model in a dense runtime where no gate pays."""
    cfg = state.config
    if cfg.dense_route == "off" or state.source is None:  # (None: not a compile of a user's model)
        return gm
    named = cfg.dense_route != "auto"
    if named:
        route.require_runtime(cfg.dense_route, f"GatingConfig(dense_route={cfg.dense_route!r})")
    runtimes = [r for r in ((cfg.dense_route,) if named else route.ROUTE_RUNTIMES)
                if route.installed(r)]
    if not runtimes:
        return gm  # auto: none installed (a named one would have raised)
    marked = [n for n in gm.graph.nodes if records(n).gate is not None and records(n).gate.gated]
    gated = [] if cfg.keeps_everything else marked  # (at keep 1.0 a gate keeps every channel)
    x = timing_input(state) if cfg.latency_aware else None
    if gated and x is None:
        return gm  # the gates stay unless a measurement says otherwise
    why = _unsupported(gm, state)
    if why is not None:
        return _not_considered(gm, state, why)
    bs = cfg.latency_batch_size
    ispc_ms = None
    if x is not None:
        built = {"ispc": NativePlanRunner(gm)}
        ispc_ms = time_runners(built, x, 3)["ispc"]  # enough to see a clear win (DENSE_EDGE)
        saved = gated_savings_ms(gated, bs)
        if saved and ispc_ms + saved > ispc_ms * (1.0 + ROUTE_MARGIN) * DENSE_EDGE:
            state.notes.append(
                f"dense route: not considered, ispc as built is clearly faster ({ispc_ms:.2f} ms "
                f"at batch {bs}; its {len(gated)} gated layer(s) save {saved:.2f} ms against "
                f"ispc's own dense kernels, more than a dense runtime gains over those)")
            return gm
        ispc_ms = time_runners(built, x, max(10, cfg.latency_rounds),
                               budget_s=WHOLE_MODEL_BUDGET_S / 4)["ispc"]
    probe = x if x is not None else state.example_inputs[0][:1]
    source = copy.deepcopy(state.source).eval()  # the user's model is never run nor changed
    with torch.no_grad():
        ref = source(probe)
    if type(ref) is not torch.Tensor:
        return _not_considered(gm, state, f"the model returns {type(ref).__name__}, not one tensor")
    try:
        onnx = route.onnx_bytes(source, state.example_inputs[0][:2])
    except Exception as exc:  # the exporter's failures are many and its own
        return _not_considered(gm, state, f"ONNX export failed: {type(exc).__name__}")
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    if x is None:  # untimed: each runtime's output here
        with torch.no_grad():
            for r in runtimes:
                outputs[r] = route.DenseRuntimeModule(source, r, onnx, tuple(probe.shape))(probe)
    else:  # each runtime in processes of its own, as it runs in the route (time_apart)
        one = bs == 1
        apart = route.time_apart(onnx, runtimes, x, threads=torch.get_num_threads(),
                                 rounds=APART_ROUNDS, calls=30 if one else 5,
                                 warmup=5 if one else 1)
        for r, res in apart.items():
            if res["ms"] is None or res["output"] is None:
                state.notes.append(f"dense route: {LABELS[r]} left out: its worker failed "
                                   f"({res['note']})")
                continue
            outputs[r] = torch.from_numpy(res["output"])
            times[r] = res["ms"]
    cands = []
    for r, out in outputs.items():
        err = route.rel_err(out, ref)
        if err <= MAX_REL_ERR:
            cands.append(r)
        else:
            state.notes.append(f"dense route: {LABELS[r]} left out: its output differs from "
                               f"the model's by {err:.1e} (relative)")
    if not cands:
        return gm
    if cfg.keeps_everything:
        reason = "keep 1.0: no layer gated"
    elif gated:
        reason = f"{len(gated)} gated layer(s) do not pay against it"
    else:
        reason = "no layer left gated"
    if ispc_ms is None:  # no gate and nothing timed: the first installed, in ROUTE_RUNTIMES' order
        best, take = cands[0], True
        figures = f"{LABELS[best]}, untimed (latency_aware off)"
    else:
        times = {r: times[r] for r in cands}
        best, take = choose(times, ispc_ms)
        others = "".join(f", {LABELS[r]} {times[r]:.2f} ms" for r in cands if r != best)
        figures = (f"{LABELS[best]} {times[best]:.2f} ms vs ispc as built {ispc_ms:.2f} ms "
                   f"at batch {bs}{others}")
        times = {"ispc": ispc_ms, **times}
    if not take:
        state.notes.append(f"dense route: not taken, ispc as built is faster ({figures})")
        return gm
    state.notes.append(f"dense route: {figures} ({reason}); the compiled model runs the dense "
                       f"model in {LABELS[best]}")
    for n in marked:
        records(n).gate = records(n).gate.ungated(f"dense route: {LABELS[best]} runs the dense "
                                                  "model faster")
    chosen = route.DenseRuntimeModule(source, best, onnx, tuple(probe.shape), decision={
        "runtime": best, "reason": reason, "batch_size": bs if times else None,
        "times_ms": dict(times) if times else None})
    as_built = fx.Graph()  # its nodes and their records, for the report; not its modules
    as_built.graph_copy(gm.graph, {})
    chosen.__dict__["as_built"] = as_built
    return route.wrap(gm, chosen)
