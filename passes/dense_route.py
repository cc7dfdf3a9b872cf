"""Pass: run the dense model in the fastest installed dense runtime where no gate pays.

Last in ``ispc.compile`` (the model as built is what it compares). Taken (``GatingConfig.
dense_route="auto"``) where no layer is left gated (``keep_ratio=1.0``, or the latency-aware checks
removed every gate), and with ``latency_aware`` unless the model as built beats the fastest
installed runtime (ONNX Runtime, OpenVINO f32) by more than :data:`ROUTE_MARGIN` in most rounds
(ties go to the runtime): all of them timed alike at ``latency_batch_size``, as a user runs them,
each in a worker process of its own, interleaved in rounds, and compared on paired per-round
ratios (:func:`time_candidates`, :func:`choose`). Where the gated layers' own timings show the model as built clearly faster than any dense runtime
could be (:data:`DENSE_EDGE`), nothing is exported or timed. The graph then calls one
:class:`~ispc.dense_route.DenseRuntimeModule` holding the user's model exported to ONNX; the
report's notes and summary give the figures. The gated graph it replaces stays readable by the
report (its nodes and records, without modules: ``DenseRuntimeModule.as_built``).
"""
from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from ispc import dense_route as route
from ispc.compiled import CompiledModel
from ispc.errors import UnsupportedModelError
from ispc.native_plan import NativePlanRunner
from ispc.report import Report
from ispc.timing import paired

from .base import PassState, records, register_pass
from .kernel_costs import time_runners, timing_input

__all__ = ["dense_route", "choose", "settled", "quiet_rounds", "time_candidates",
           "gated_savings_ms", "ROUTE_MARGIN", "RUNTIME_TIE", "DENSE_EDGE", "ROUNDS", "BLOCK_S",
           "SETTLED", "QUIET_SHARE", "SLOW_SPELL", "LABELS"]

#: the route is taken unless the model as built runs faster than the best runtime by more than
#: this fraction (the median of the per-round ratios) and in most rounds: ties go to the dense
#: runtime ("never slower than the best dense runtime"). Both are timed alike (time_candidates),
#: so it covers the noise of paired rounds only (3% while the model as built was timed in the
#: compiling process and the runtimes in workers, 10% while all were timed here)
ROUTE_MARGIN = 0.02
#: ONNX Runtime is taken over OpenVINO only where it is faster by more than this fraction (the
#: median of the per-round ratios) and in most rounds: within it OpenVINO, whose thread pool does
#: not slow the torch work after a call (ONNX Runtime's is stopped after each call for that)
RUNTIME_TIE = 0.01
#: the fastest dense runtime ran up to 1.14x faster than ispc's own dense kernels (ResNet-50 at
#: batch 1, release 0.6.0: 0.88x); where the gated layers' measured savings make ispc's dense model
#: slower than the model as built by more than this (times 1 + ROUTE_MARGIN), no dense runtime can
#: win and the route is not considered (no export, no runtime timed)
DENSE_EDGE = 1.25
#: rounds in which the candidates are timed (time_candidates), at batch 1 and at larger batches:
#: at least the first, at most the second while the decision is not settled (:func:`settled`)
#: or rounds were busy (:func:`quiet_rounds`)
ROUNDS = ((9, 21), (2, 3))
#: a comparison is settled once its median per-round ratio lies this far from its threshold
#: (RUNTIME_TIE, ROUTE_MARGIN): closer, another round is timed (up to ROUNDS' maximum)
SETTLED = 0.02
#: a round is busy where a candidate's block got less CPU per thread than this fraction of its
#: median block's: something else held a core, which slows the runtimes' spinning pools more
#: than ispc's kernels; busy rounds are left out of the decision (all candidates alike)
QUIET_SHARE = 0.8
#: a round is slow where the model as built read more than this times its time in the compiling
#: process just before (quiet_rounds)
SLOW_SPELL = 1.1
#: about this long a block of timed calls per candidate and round (s), at batch 1 and larger
BLOCK_S = (0.12, 1.0)
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


def choose(rounds_ms: dict[str, list[float]], ispc: str | None = "ispc") -> tuple[str, bool]:
    """The runtime the route takes from per-round timings (block medians, ms, the same rounds
    for every name; at least one runtime), and whether the route is taken. Runtimes in
    :data:`ROUTE_RUNTIMES` order (OpenVINO first): a later one replaces the choice only where it
    beats it by :data:`RUNTIME_TIE` (:meth:`ispc.timing.Paired.beats`). The route is taken unless ``ispc`` (the model as
    built; None: not timed) beats the chosen runtime by :data:`ROUTE_MARGIN`."""
    names = [r for r in route.ROUTE_RUNTIMES if r in rounds_ms]
    best = names[0]
    for r in names[1:]:
        if paired(rounds_ms[r], rounds_ms[best]).beats(RUNTIME_TIE):
            best = r
    take = (ispc is None or ispc not in rounds_ms
            or not paired(rounds_ms[ispc], rounds_ms[best]).beats(ROUTE_MARGIN))
    return best, take


def settled(rounds_ms: dict[str, list[float]], ispc: str | None = "ispc") -> bool:
    """Whether :func:`choose`'s comparisons on these rounds are out of the noise: each other
    runtime against the chosen one, and ``ispc`` against it, have a median per-round ratio at
    least :data:`SETTLED` from the threshold that decides (1 - margin)."""
    if not any(r in rounds_ms for r in route.ROUTE_RUNTIMES):
        return True  # (no runtime left to compare with)
    best, _ = choose(rounds_ms, ispc)
    checks = [(r, RUNTIME_TIE) for r in route.ROUTE_RUNTIMES if r in rounds_ms and r != best]
    if ispc is not None and ispc in rounds_ms:
        checks.append((ispc, ROUTE_MARGIN))
    for name, margin in checks:
        p = paired(rounds_ms[name], rounds_ms[best])
        if p.rounds and abs(p.median - (1.0 - margin)) < SETTLED:
            return False
    return True


def quiet_rounds(shares: dict[str, list[float]], rounds_ms: dict[str, list[float]] | None = None,
                 ref_ms: float | None = None) -> list[int]:
    """The rounds in which no candidate's block got less CPU than :data:`QUIET_SHARE` of its
    median block's (``shares``: name -> CPU share per thread of each round's block) and, given
    ``ref_ms`` (the model as built, timed in the compiling process just before), its worker's
    block (``rounds_ms["ispc"]``) read at most :data:`SLOW_SPELL` times that: a slow spell of
    this VM slows the runtimes' pools more than ispc's kernels (MobileNetV2: ONNX Runtime and
    OpenVINO 6.3-7.0 ms, ispc 5.5 against 4.8 in the compiling process), and CPU shares do not
    show it."""
    n = min((len(v) for v in shares.values()), default=0)
    med = {k: statistics.median(v[:n]) for k, v in shares.items() if n}
    slow = (rounds_ms or {}).get("ispc") if ref_ms else None
    return [i for i in range(n) if all(v[i] >= QUIET_SHARE * med[k] for k, v in shares.items())
            and (slow is None or i >= len(slow) or slow[i] <= SLOW_SPELL * ref_ms)]


def _quiet(rounds_ms: dict[str, list[float]], shares: dict[str, list[float]],
           ref_ms: float | None = None) -> dict[str, list[float]]:
    """``rounds_ms`` in the quiet rounds only (all of them where fewer than 3 are quiet)."""
    keep = quiet_rounds(shares, rounds_ms, ref_ms)
    if len(keep) < min(3, min((len(v) for v in rounds_ms.values()), default=0)):
        return rounds_ms
    return {k: [v[i] for i in keep] for k, v in rounds_ms.items()}


def time_candidates(gm: fx.GraphModule, state: PassState, onnx: bytes, runtimes: list[str],
                    x: torch.Tensor, ref_ms: float | None = None) -> dict[str, dict[str, Any]]:
    """The model as built (``"ispc"``) and each runtime behind the route, timed as a user runs
    them, alike: each in a fresh worker process of its own (the model as built pickled, with the
    eager backend's runner attached there; each runtime through the route's module and runner in
    a torch process), interleaved in rounds (:func:`ispc.dense_route.time_interleaved`): the
    first of :data:`ROUNDS`, then more while the quiet rounds are fewer or the decision is not
    :func:`settled` (``ref_ms``: the model as built in this process, :func:`quiet_rounds`). The
    model as built is left out, with a note, where it does not pickle."""
    bs = x.shape[0]
    one = bs == 1
    least, most = ROUNDS[0 if one else 1]

    def extend(sofar: dict[str, dict[str, list[float]]]) -> bool:
        rounds_ms = {k: v["rounds_ms"] for k, v in sofar.items()}
        quiet = quiet_rounds({k: v["shares"] for k, v in sofar.items()}, rounds_ms, ref_ms)
        if len(quiet) < least:
            return True
        return not settled({k: [v[i] for i in quiet] for k, v in rounds_ms.items()})

    with tempfile.TemporaryDirectory(prefix="ispc-candidates-") as tmp:
        work = Path(tmp)
        (work / "model.onnx").write_bytes(onnx)
        jobs: dict[str, dict[str, Any]] = {}
        try:
            built = CompiledModel(gm, Report(), state.config, backend="eager")
            torch.save(built, work / "as_built.pt")
            jobs["ispc"] = {"runtime": "ispc_built", "artifact": str(work / "as_built.pt")}
        except Exception as exc:  # a model that does not pickle: the runtimes alone
            state.notes.append(f"dense route: ispc as built not timed beside the runtimes: it "
                               f"could not be pickled ({type(exc).__name__})")
        for r in runtimes:
            jobs[r] = {"runtime": "route", "route_runtime": r, "artifact": str(work / "model.onnx"),
                       "spinning": state.config.route_spinning}
        with tqdm(total=least, desc="ispc: timing the dense route", unit="round",
                  disable=not state.progress, leave=False) as bar:

            def tick() -> None:  # a round beyond the least: the bar grows with it
                if bar.n >= bar.total:
                    bar.total = bar.n + 1
                bar.update()

            # at larger batches no warm-up call and blocks of one call where a call takes about
            # BLOCK_S: ResNet-50's keep-1.0 compile at batch 32 spent 150 s, 30 s of it here
            return route.time_interleaved(jobs, x[None], threads=torch.get_num_threads(),
                                          rounds=least, max_rounds=most, extend=extend,
                                          on_round=tick, warmup=2 if one else 0,
                                          block_s=BLOCK_S[0 if one else 1],
                                          min_calls=2 if one else 1, max_calls=30 if one else 3,
                                          probe=one)


def _paired_figures(rounds_ms: dict[str, list[float]], best: str) -> str:
    """``; per round against OpenVINO f32: ...``: each other candidate's median per-round ratio
    to ``best`` and the rounds it was faster in."""
    parts = []
    for k in rounds_ms:
        if k != best:
            p = paired(rounds_ms[k], rounds_ms[best])
            if p.rounds:
                parts.append(f"{'ispc as built' if k == 'ispc' else LABELS[k]} x{p.median:.3f}, "
                             f"faster in {p.faster_in} of {p.rounds}")
    return f"; per round against {LABELS[best]}: {'; '.join(parts)}" if parts else ""


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
    ref_ms = None  # the model as built here: a slow spell shows against it (quiet_rounds)
    if gated:  # a clear win needs no export and no worker (3 rounds here are enough to see it)
        ispc_ms = ref_ms = time_runners({"ispc": NativePlanRunner(gm)}, x, 3)["ispc"]
        saved = gated_savings_ms(gated, bs)
        if saved and ispc_ms + saved > ispc_ms * (1.0 + ROUTE_MARGIN) * DENSE_EDGE:
            state.notes.append(
                f"dense route: not considered, ispc as built is clearly faster ({ispc_ms:.2f} ms "
                f"at batch {bs}; its {len(gated)} gated layer(s) save {saved:.2f} ms against "
                f"ispc's own dense kernels, more than a dense runtime gains over those)")
            return gm
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
    timed: dict[str, dict[str, Any]] = {}
    if x is None:  # untimed: each runtime's output here
        with torch.no_grad():
            for r in runtimes:
                outputs[r] = route.DenseRuntimeModule(source, r, onnx, tuple(probe.shape),
                                                      spinning=cfg.route_spinning)(probe)
    else:  # the model as built and each runtime, alike, in workers of their own (time_candidates)
        if ref_ms is None and bs == 1:  # (at larger batches too few rounds to leave any out)
            ref_ms = time_runners({"ispc": NativePlanRunner(gm)}, x, 3)["ispc"]
        timed = time_candidates(gm, state, onnx, runtimes, x, ref_ms)
        for name, res in timed.items():
            if name != "ispc" and (res["ms"] is None or res["output"] is None):
                state.notes.append(f"dense route: {LABELS[name]} left out: its worker failed "
                                   f"({res['note']})")
            elif name != "ispc":
                outputs[name] = torch.from_numpy(res["output"])
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
    times: dict[str, float] = {}
    if x is None:  # no gate and nothing timed: the first installed, in ROUTE_RUNTIMES' order
        best, take = cands[0], True
        figures = f"{LABELS[best]}, untimed (latency_aware off)"
        rounds_ms: dict[str, list[float]] = {}
    else:
        ispc_res = timed.get("ispc") or {}
        if ispc_res.get("ms") is None and "ispc" in timed:
            state.notes.append(f"dense route: ispc as built left out: its worker failed "
                               f"({ispc_res.get('note')})")
        names = cands + (["ispc"] if ispc_res.get("ms") is not None else [])
        timed_rounds = {k: timed[k]["rounds_ms"] for k in names}
        rounds_ms = _quiet(timed_rounds, {k: timed[k]["shares"] for k in names}, ref_ms)
        busy = len(next(iter(timed_rounds.values()))) - len(next(iter(rounds_ms.values())))
        times = {k: timed[k]["ms"] for k in names}
        best, take = choose(rounds_ms)
        if gated and "ispc" not in times:
            take = False  # the gates stay unless a measurement says otherwise
        figures = (f"{LABELS[best]} {times[best]:.2f} ms vs ispc as built "
                   + (f"{times['ispc']:.2f} ms" if "ispc" in times else "untimed")
                   + f" at batch {bs}"
                   + "".join(f", {LABELS[r]} {times[r]:.2f} ms" for r in cands if r != best)
                   + _paired_figures(rounds_ms, best)
                   + (f" ({busy} busy or slow round(s) left out)" if busy else ""))
        times = {**({"ispc": times["ispc"]} if "ispc" in times else {}),
                 **{r: times[r] for r in cands}}
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
        "times_ms": dict(times) if times else None,
        "rounds_ms": dict(rounds_ms) if rounds_ms else None}, spinning=cfg.route_spinning)
    as_built = fx.Graph()  # its nodes and their records, for the report; not its modules
    as_built.graph_copy(gm.graph, {})
    chosen.__dict__["as_built"] = as_built
    return route.wrap(gm, chosen)
