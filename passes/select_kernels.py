"""Select each gated layer's CPU kernel, and keep a layer dense where gating does not pay.

Without ``GatingConfig(latency_aware=True)`` every gated layer takes the kernel the shape-based
cost model predicts; with it, each layer's kernels are measured (:mod:`ispc.passes.kernel_costs`
has both cost models), a layer whose best kernel does not beat its dense convolution by
``min_gain`` is left dense, and a whole-model check, timing each configuration as the compile goes
on to build it (:func:`~ispc.passes.kernel_costs.built_runner`), keeps the gates only if the gated
model is faster than the dense one (in either layout, where the layout is left to measurement).
This makes the compiled model never slower than dense, at the price of results that depend on the
machine and its load. Writes each layer's :class:`~ispc.records.KernelChoice`, and revises its
:class:`~ispc.records.GateDecision` where it is left dense.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ispc.config import GatingConfig
from ispc.modules import GatedConv2d, dense_conv
from ispc.ops import native
from ispc.records import GateDecision

from . import kernel_costs as costs
from .base import PassState, apply_kernel, records, register_pass, replace_submodule
from .channels_last import layout_converters, runs_channels_last

__all__ = ["select_kernels", "LAYOUT_MARGIN", "LAYOUT_PROBE_RATIO", "PROGRAM_WHOLE_MARGIN", "CUDA_NOTE",
           "DENSE_ROUTE_NOTE", "WHOLE_MODEL_BUDGET_S", "KEEPS_EVERY_CHANNEL"]

#: with the layout left to measurement (``GatingConfig.channels_last=None``), channels-last is kept
#: only where the layers reading channels-last maps measured faster in sum than on NCHW maps and
#: the whole model then measured faster than NCHW by more than this fraction. VGG-16 gains 4% from
#: it at batch 1; ResNets lose (a residual add that mixes layouts is slow), and without the
#: per-layer test one whole-model check kept it for ResNet-50 on noise
LAYOUT_MARGIN = 0.01

#: with the layout left to measurement, the gated layers' NCHW kernels are timed one by one only
#: if the whole model with the predicted NCHW kernels measured under this many times the
#: channels-last one (a per-layer choice gains NCHW some percent, not this much): ResNet-50 and
#: MobileNetV2 at batch 32 ran 1.4-2x slower on NCHW maps, and timing each of their layers on
#: them was half of a 94 s compile that kept channels-last
LAYOUT_PROBE_RATIO = 1.2

#: on channels-last maps the gated layers whose measured kernel leaves the runner's native program
#: (``gather``, ``native``: not ``nhwc``) keep it only where the whole model measured faster with
#: them than with those layers back on the predicted ``nhwc`` kernel by more than this fraction:
#: the per-layer timing cannot see the program split (the layers around run one by one), and a
#: slow spell of the machine during one layer's timing can still beat costs.PROGRAM_MARGIN
PROGRAM_WHOLE_MARGIN = 0.03

#: said when a model is gated on a GPU without latency-aware selection
CUDA_NOTE = ("ispc: gated layers on CUDA run a Triton kernel that has not been timed on a GPU yet "
             "(its predecessor measured 1.6-8.6x the time of cuDNN's dense convolution per layer "
             "on an H200, see docs/gpu.md); the gates' accuracy is the same as on the CPU, but for "
             "speed pass GatingConfig(latency_aware=True), which keeps only layers that pay on "
             "this GPU")


#: why a layer whose top-k gate keeps all its channels is left dense untimed
KEEPS_EVERY_CHANNEL = "its top-k gate keeps every input channel (k = channels): no MACs to skip"

#: seconds of calls after which the whole-model check stops timing (past its fifth round)
WHOLE_MODEL_BUDGET_S = 20.0

#: said where the whole-model check removes every gate: the model is dense PyTorch then, and other
#: dense runtimes may run it faster
DENSE_ROUTE_NOTE = ("Deploy the dense model in the fastest dense runtime: `ispc bench MODEL "
                    "--runtimes` times PyTorch eager, inductor, ONNX Runtime and OpenVINO here and "
                    "names the fastest and how to deploy it")


def _apply(gm: fx.GraphModule, node: fx.Node, m: costs.Measurement, cfg: GatingConfig) -> bool:
    """Record measurement ``m`` of the layer at ``node``: its kernel, or the dense layer in its
    place where gating does not pay. Returns whether the graph changed."""
    apply_kernel(node, m.choice(cfg), gm.get_submodule(node.target))
    if m.gated:
        return False
    replace_submodule(gm, node.target, m.plain)
    records(node).gate = records(node).gate.ungated(m.reason(cfg))
    return True


@register_pass("select_kernels")
def select_kernels(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Choose each gated layer's kernel; with ``latency_aware``, un-gate layers that don't pay."""
    cfg = state.config
    nodes = {n.target: n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GatedConv2d)}
    measured = cfg.latency_aware and state.calibration_cache and nodes
    if not cfg.latency_aware and any(gm.get_submodule(n).weight.is_cuda for n in nodes):
        state.notes.append(CUDA_NOTE)
        warnings.warn(CUDA_NOTE, stacklevel=2)
    if not measured:
        nhwc = bool(cfg.channels_last) and runs_channels_last(gm)  # maps channels-last throughout
        for name, node in nodes.items():
            mod: GatedConv2d = gm.get_submodule(name)
            apply_kernel(node, costs.predicted_choice(mod, node, channels_last=nhwc), mod)
        if cfg.channels_last is None:
            for c in layout_converters(gm):  # a layout left to measurement that was not measured
                c.enabled = False
        return gm
    x = costs.timing_input(state)
    inputs = costs.layer_inputs(gm, list(nodes), x)
    changed = False
    cache: dict[tuple, costs.Measurement] = {}  # one timing per layer geometry (costs.geometry)
    bar = tqdm(total=len(inputs), desc="ispc: timing kernels", unit="layer",
               disable=not state.progress, leave=False)
    # each gated layer and its gate before any choice (a layer left dense in one layout may stay
    # gated in the other)
    originals = {n: gm.get_submodule(n) for n in nodes}
    gates = {n: records(node).gate for n, node in nodes.items()}

    def choose(name: str, xin: torch.Tensor) -> None:
        nonlocal changed
        mod = gm.get_submodule(name)
        if costs.keeps_every_channel(mod):
            replace_submodule(gm, name, costs.left_dense(mod, xin, nodes[name]))
            records(nodes[name]).gate = records(nodes[name]).gate.ungated(KEEPS_EVERY_CHANNEL)
            changed = True
            bar.update()
            return
        changed |= _apply(gm, nodes[name], costs.measure(gm.get_submodule(name), xin, nodes[name], cfg,
                                                         cache), cfg)
        bar.update()

    for name in nodes:
        if name in inputs:
            choose(name, inputs[name])
    nchw: dict[str, tuple[nn.Module, costs.Measurement]] = {}
    if runs_channels_last(gm):
        # a layer on the native kernel hands the layers after it NCHW maps: time again, on the
        # input they now see, the layers whose input layout the first round's choices changed
        now = costs.layer_inputs(gm, [n for n in nodes if isinstance(gm.get_submodule(n), GatedConv2d)], x)
        bar.total += sum(native.is_channels_last(xin) != native.is_channels_last(inputs[name])
                         for name, xin in now.items())
        for name, xin in now.items():
            if native.is_channels_last(xin) != native.is_channels_last(inputs[name]):
                choose(name, xin)
                inputs[name] = xin
        if cfg.channels_last is None and _nchw_may_win(gm, state, x, nodes, originals, inputs):
            # the other layout's kernels, for the whole-model check to time both: every layer
            # that reads a channels-last map, timed on the same map in NCHW
            bar.total += sum(native.is_channels_last(xin) for xin in inputs.values())
            for name, xin in inputs.items():
                if native.is_channels_last(xin):
                    alt = copy.deepcopy(originals[name])
                    m = costs.measure(alt, xin.contiguous(), nodes[name], cfg, cache)
                    bar.update()
                    if m.gated:
                        alt.set_strategy(*m.best)
                    nchw[name] = (alt if m.gated else m.plain, m)
        if nchw:
            bar.set_postfix_str("layouts")
            t_nhwc, t_nchw = costs.layout_sums(gm, x, nodes, {n: alt for n, (alt, _) in nchw.items()},
                                               inputs, cfg)
            if t_nhwc >= t_nchw:
                # the convolutions that read channels-last maps are not faster for it, in sum
                # (ResNets: the native kernel converts its input back, and a residual add mixes
                # layouts): NCHW, without a whole-model timing that, within its noise, could say
                # otherwise
                _use_nchw(gm, nchw, gates, cfg)
                nchw = {}
                changed = True
                state.notes.append(f"channels_last: the convolutions reading channels-last maps "
                                   f"took {t_nhwc:.2f} ms, {t_nchw:.2f} ms on NCHW maps; the maps "
                                   "stay NCHW")
    if changed:
        gm.recompile()
    if any(isinstance(m, GatedConv2d) for m in gm.modules()) or nchw:
        bar.set_postfix_str("whole model")
        _whole_model_check(gm, state, x, nodes, nchw, gates, originals)
    elif cfg.channels_last is None and layout_converters(gm):
        bar.set_postfix_str("dense layout")
        _dense_layout_check(gm, state, x)
    bar.close()
    return gm


def _nchw_may_win(gm: fx.GraphModule, state: PassState, x: torch.Tensor, nodes: dict[str, fx.Node],
                  originals: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> bool:
    """Whether NCHW maps could make the gated model faster: the whole model as built
    (:func:`costs.built_runner`) with the channels-last choices, against NCHW maps with every
    layer that read a channels-last map gated on its predicted NCHW kernel, under
    :data:`LAYOUT_PROBE_RATIO` times as slow. Else the NCHW kernels are not timed (a note says
    so)."""
    alts = {name: _predicted_copy(originals[name], nodes[name], channels_last=False)
            for name, xin in inputs.items()
            if native.is_channels_last(xin) and type(originals[name]) is GatedConv2d}
    if not alts:
        return True
    converters = {c: c.enabled for c in layout_converters(gm)}
    runners = {"model_channels_last": costs.built_runner(gm, state)}
    for c in converters:
        c.enabled = False
    try:
        runners["model_nchw"] = costs.built_runner(gm, state, alts)
    finally:
        for c, enabled in converters.items():
            c.enabled = enabled
    t = costs.time_runners(runners, x, 3, budget_s=WHOLE_MODEL_BUDGET_S / 2)
    if t["model_nchw"] < t["model_channels_last"] * LAYOUT_PROBE_RATIO:
        return True
    state.notes.append(f"channels_last: the gated model took {t['model_channels_last']:.2f} ms "
                       f"channels-last, {t['model_nchw']:.2f} ms on NCHW maps with the predicted "
                       "kernels; the NCHW kernels were not timed")
    return False


def _faster_layout(times: dict[str, float], nchw: str, channels_last: str) -> str:
    """``channels_last`` if it was timed and is faster than ``nchw`` (the user's layout) by
    :data:`LAYOUT_MARGIN`, else ``nchw``."""
    return (channels_last if channels_last in times
            and times[channels_last] < times[nchw] * (1.0 - LAYOUT_MARGIN) else nchw)


def _predicted_copy(mod: GatedConv2d, node: fx.Node, *, channels_last: bool) -> GatedConv2d:
    """A copy of the gated layer ``mod`` on the kernel the cost model predicts for its shape."""
    alt = copy.deepcopy(mod)
    o_hw = costs.out_hw(node)
    alt.set_strategy(*costs.predicted_strategy(alt, o_hw, costs.input_hw(node),
                                               channels_last=channels_last),
                     out_hw=costs.known_hw(o_hw))
    return alt


def _dense_layout_check(gm: fx.GraphModule, state: PassState, x: torch.Tensor) -> None:
    """No layer is left gated and the layout is free: the dense model as built runs in the faster
    layout, channels-last only where it beats the user's NCHW by :data:`LAYOUT_MARGIN` (dense
    ResNets and MobileNetV2 run 1.4-1.6x faster channels-last on the native kernels at batch 1)."""
    converters = layout_converters(gm)
    runners = {}
    for label in ("dense", "dense_nhwc"):
        for c in converters:
            c.enabled = label == "dense_nhwc"
        runners[label] = costs.built_runner(gm, state, dense_kernels=not x.is_cuda)
    t = costs.time_runners(runners, x, max(5, state.config.latency_rounds // 2), cuda=x.is_cuda,
                           budget_s=WHOLE_MODEL_BUDGET_S)
    channels_last = _faster_layout(t, "dense", "dense_nhwc") == "dense_nhwc"
    for c in converters:
        c.enabled = channels_last
    state.notes.append(f"whole-model check at batch {state.config.latency_batch_size}: no layer "
                       f"gated; the dense model took {t['dense']:.2f} ms on NCHW maps, "
                       f"{t['dense_nhwc']:.2f} ms channels-last; "
                       f"{'channels-last' if channels_last else 'NCHW'}. {DENSE_ROUTE_NOTE}")
    gm.recompile()


def _whole_model_check(gm: fx.GraphModule, state: PassState, x: torch.Tensor,
                       nodes: dict[str, fx.Node], nchw: dict[str, tuple[nn.Module, costs.Measurement]],
                       gates: dict[str, GateDecision | None],
                       originals: dict[str, nn.Module]) -> None:
    """Per-layer wins need not add up (caches, dispatch): time the whole gated graph against the
    same graph with every gate removed; if gating is not faster, remove every gate. On
    channels-last maps the graph with every layer gated (those the per-layer timing left dense
    on their predicted kernel) is timed too, and kept where it saves ``min_gain`` of those layers'
    dense times: per-layer timings at large batches are short runs that a busy spell of a shared
    machine can tip (ResNet-50 at batch 32 came back with 35 to 52 of its 52 layers gated from one
    compile to the next). Likewise the graph with every gated layer whose measured kernel leaves
    the native program back on the predicted ``nhwc`` kernel, kept unless the measured kernels are
    faster by :data:`PROGRAM_WHOLE_MARGIN` (the program split costs the layers around them too).

    With the layout left to measurement (``GatingConfig.channels_last=None``) both are timed in
    both layouts (the gated graph on NCHW maps with the kernels measured for NCHW inputs,
    ``nchw``), and the faster layout of each is compared: the compiled model is then never slower
    than the dense model in either layout (dense MobileNetV2 runs 1.44x faster channels-last at
    batch 1 on a 2-core Xeon, faster than gated on NCHW maps: it comes back dense,
    channels-last)."""
    cfg = state.config
    current = {n: gm.get_submodule(n) for n in nodes}
    converters = layout_converters(gm)
    nhwc = runs_channels_last(gm)
    free = bool(converters) and cfg.channels_last is None  # the layout is measured here
    hws = {n: costs.input_hw(node) for n, node in nodes.items()}

    def swap(mods: dict[str, nn.Module], channels_last: bool) -> None:
        for name, m in mods.items():
            replace_submodule(gm, name, m)
        for c in converters:
            c.enabled = channels_last

    dense = {n: dense_conv(m, hws.get(n)) if isinstance(m, GatedConv2d) else m
             for n, m in current.items()}
    configs = {"gated": (current, nhwc)}
    regated: dict[str, nn.Module] = {}  # the layers left dense, gated on their predicted kernel
    program: dict[str, nn.Module] = {}  # the gated layers off the native program, back on nhwc
    if nhwc and not x.is_cuda:
        regated = {n: _predicted_copy(originals[n], nodes[n], channels_last=True)
                   for n, m in current.items() if not isinstance(m, GatedConv2d)
                   and type(originals[n]) is GatedConv2d and gates[n] is not None}
        for n, m in current.items():
            if type(m) is GatedConv2d and m.strategy != "nhwc":
                alt = _predicted_copy(m, nodes[n], channels_last=True)
                if alt.strategy == "nhwc":
                    program[n] = alt
    if program:
        configs["gated_program"] = ({**current, **program}, nhwc)
    if regated:  # on top of the program configuration: the one kept unless clearly slower
        configs["gated_all"] = ({**current, **program, **regated}, nhwc)
    if free and nhwc and nchw:
        configs["gated_nchw"] = ({**current, **{n: m for n, (m, _) in nchw.items()}}, False)
    configs["dense"] = (dense, nhwc and not free)
    if free:
        configs["dense_nhwc"] = (dense, True)
    # each configuration timed as the compile goes on to build it (costs.built_runner): plain
    # layers on the native kernels, epilogues fused, native programs. One call at a time, the
    # configurations alternating, so that a slow spell of a shared machine hits both alike. Timed
    # in blocks of a few calls per configuration, the check once removed every gate of a
    # MobileNetV2 that runs ~1.25x faster gated (benchmarks/speed.py at batch 1; compiled again
    # alone, it kept them all). A layout is a smaller difference than gating's: more rounds for it.
    runners = {}
    for label, c in configs.items():
        swap(*c)
        runners[label] = costs.built_runner(gm, state, dense_kernels=not x.is_cuda)
    swap(*configs["gated"])
    rounds = max(5, cfg.latency_rounds if free else cfg.latency_rounds // 2)
    # a configuration clearly slower than the leader stops being timed (costs.PRUNE_RATIO), and
    # past five rounds, WHOLE_MODEL_BUDGET_S of calls are enough (ResNet-50 at batch 32: ~1 s a call)
    times = costs.time_runners(runners, x, rounds, cuda=x.is_cuda, prune_ratio=costs.PRUNE_RATIO,
                               budget_s=WHOLE_MODEL_BUDGET_S)
    del runners

    # gated again only where the whole model saves what min_gain asks of those layers alone
    need = cfg.min_gain * sum((records(nodes[n]).kernel.times_ms or {}).get("dense", 0.0)
                              for n in regated if records(nodes[n]).kernel is not None)
    base = ("gated_program" if "gated_program" in times and not
            times["gated"] < times["gated_program"] * (1.0 - PROGRAM_WHOLE_MARGIN) else "gated")
    gated_cl = ("gated_all" if "gated_all" in times and (base != "gated" or not program)
                and times["gated_all"] < times[base] - need else base)
    best = _faster_layout(times, "gated_nchw", gated_cl) if "gated_nchw" in configs else gated_cl
    best_dense = _faster_layout(times, "dense", "dense_nhwc")
    t_gated, t_dense = times[best], times[best_dense]
    layout = ""
    if free:
        layout = " (" + ", ".join(
            f"{'gated' if k.startswith('gated') else 'dense'}"
            f"{' (every layer)' if k == 'gated_all' else ' (nhwc)' if k == 'gated_program' else ''} "
            f"{'channels-last' if configs[k][1] else 'NCHW'} {times[k]:.2f} ms"
            for k in configs) + ")"
    if t_gated < t_dense:
        swap(*configs[best])
        if best == "gated_nchw":
            for name, (_, m) in nchw.items():
                _record_nchw(nodes[name], m, cfg, gates[name])
        whole = {**(program if best in ("gated_program", "gated_all") else {}),
                 **(regated if best == "gated_all" else {})}
        if whole:
            for name, m in whole.items():
                rec = records(nodes[name])
                if name in regated:
                    rec.gate = gates[name]
                rec.kernel = dataclasses.replace(
                    costs.predicted_choice(m, nodes[name], channels_last=True),
                    cost_model="measured_whole_model", batch_size=cfg.latency_batch_size,
                    input_layout="channels_last")
        gm.recompile()
        kept = f"; gated, {'channels-last' if configs[best][1] else 'NCHW'}" if free else ""
        if program:
            off = ", ".join(sorted({current[n].strategy for n in program}))
            back = best in ("gated_program", "gated_all")
            kept += (f"; the {len(program)} layer(s) measured on kernels off the native program "
                     f"({off}) {'run nhwc' if back else 'stay on them'} (on nhwc "
                     f"{times['gated_program']:.2f} ms, on {off} {times['gated']:.2f} ms)")
        if regated:
            kept += (f"; the {len(regated)} layer(s) per-layer timing left dense "
                     f"{'gated too' if best == 'gated_all' else 'stay dense'} (every layer gated "
                     f"{times['gated_all']:.2f} ms)")
        state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated "
                           f"{t_gated:.2f} ms vs dense {t_dense:.2f} ms{layout}{kept}")
        return
    swap(*configs[best_dense])
    for name, m in current.items():
        if isinstance(m, GatedConv2d):
            rec = records(nodes[name])
            rec.gate = rec.gate.ungated(f"whole model not faster gated at batch "
                                        f"{cfg.latency_batch_size} ({t_gated:.2f} ms vs dense "
                                        f"{t_dense:.2f} ms)")
    kept = f"; dense, {'channels-last' if configs[best_dense][1] else 'NCHW'}" if free else ""
    state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated {t_gated:.2f} ms "
                       f"was not faster than dense {t_dense:.2f} ms, so every gate was removed"
                       f"{layout}{kept}. {DENSE_ROUTE_NOTE}")
    gm.recompile()


def _use_nchw(gm: fx.GraphModule, nchw: dict[str, tuple[nn.Module, costs.Measurement]],
              gates: dict[str, GateDecision | None], cfg: GatingConfig) -> None:
    """Run NCHW: converters off, the kernels measured on NCHW inputs in place, their records."""
    for c in layout_converters(gm):
        c.enabled = False
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, (mod, m) in nchw.items():
        replace_submodule(gm, name, mod)
        _record_nchw(nodes[name], m, cfg, gates[name])


def _record_nchw(node: fx.Node, m: costs.Measurement, cfg: GatingConfig,
                 gate: GateDecision | None) -> None:
    """The records of a layer that runs the kernel measured for NCHW inputs (or dense): its gate
    as it was before the channels-last choices, which may have left it dense."""
    rec = records(node)
    if gate is not None:
        rec.gate = gate
    rec.kernel = m.choice(cfg)
    if not m.gated:
        rec.gate = rec.gate.ungated(m.reason(cfg))
