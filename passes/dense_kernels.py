"""Run the ungated convolutions of a channels-last model on ispc's own dense kernels where they pay.

A gated model still has dense convolutions: stems, downsample shortcuts, MobileNetV2's depthwise
layers, and layers that selection left dense. In eager PyTorch each is a oneDNN call that reorders
its weights on every call and applies its activation as a pass of its own.
:class:`~ispc.modules.NhwcDenseConv2d` runs such a layer on the native channels-last kernels (the
dense mode of the gated kernel, or the depthwise 3x3 one) with weights packed once and the epilogue
fused (``fuse_epilogues`` runs after this pass). Only where the model's maps are channels-last.

With ``GatingConfig(latency_aware=True)`` each candidate layer is timed both ways on its real input
at ``latency_batch_size`` and the faster is kept (records: :class:`~ispc.records.KernelChoice`
``nhwc`` or ``onednn``, with the times); the layers left on oneDNN then move too if the whole
model, timed as the eager backend runs it, is faster with them native (a oneDNN layer splits a
native program: ``cost_model="measured_whole_model"``). Otherwise the layers
:data:`PREDICTED_KINDS` names move.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from ispc.modules import NhwcDenseConv2d
from ispc.ops import native
from ispc.ops.cpu_kernels import nhwc_serves
from ispc.records import KernelChoice

from . import kernel_costs as costs
from .base import PassState, module_call_counts, records, register_pass, replace_submodule
from .channels_last import runs_channels_last
from .fuse_epilogues import activation_of

__all__ = ["dense_kernels", "PREDICTED_KINDS", "kind_of"]

#: without measurement, the kinds of dense layer that move to the native kernels (per layer
#: against oneDNN with prepacked weights, benchmarks/layers.py; eager oneDNN reorders per call)
PREDICTED_KINDS = frozenset({"depthwise", "pointwise", "spatial"})


def kind_of(conv: nn.Conv2d) -> str:
    """``depthwise``, ``pointwise`` (1x1), ``stem`` (fewer than 8 input channels) or ``spatial``."""
    if conv.groups > 1:
        return "depthwise"
    if conv.in_channels < 8:
        return "stem"
    return "pointwise" if conv.kernel_size == (1, 1) else "spatial"


def _native_whole_model_faster(gm: fx.GraphModule, state: PassState, x: torch.Tensor,
                               moves: dict[str, NhwcDenseConv2d]) -> bool:
    """Whether the model runs faster with ``moves`` (layers oneDNN ran faster alone) on the native
    kernels too, each way timed whole as the eager backend runs it (epilogues fused, the native
    runs of layers as one program: a oneDNN layer splits a run, and its batch's maps then go
    through memory; MobileNetV2 at batch 32 ran 1.8x faster all native, 2-core Xeon)."""
    runners = {label: costs.built_runner(gm, state, mods, dense_kernels=False)
               for label, mods in (("per_layer", {}), ("native", moves))}
    times = costs.time_runners(runners, x, max(3, state.config.latency_rounds // 3),
                               prune_ratio=costs.PRUNE_RATIO)
    return times["native"] < times["per_layer"]


def _activation_after(gm: fx.GraphModule, node: fx.Node):
    """The activation after ``node`` that ``fuse_epilogues`` would fuse into the native kernel's
    stores, as an in-place function, or None: after oneDNN it is a pass over memory of its own,
    timed with oneDNN's call."""
    users = list(node.users)
    act = activation_of(gm, users[0]) if len(users) == 1 and users[0].args[:1] == (node,) else None
    return {"relu": torch.relu_, "relu6": lambda t: t.clamp_(0.0, 6.0)}.get(act)


@register_pass("dense_kernels", builds=True)
def dense_kernels(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Replace plain channels-last convolutions by :class:`NhwcDenseConv2d` where it pays."""
    cfg = state.config
    if not (native.available() and runs_channels_last(gm)):
        return gm
    calls = module_call_counts(gm)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and calls[n.target] == 1
             and type(gm.get_submodule(n.target)) is nn.Conv2d
             and NhwcDenseConv2d.fits(gm.get_submodule(n.target))}
    if not nodes:
        return gm
    measured = cfg.latency_aware and bool(state.calibration_cache)
    moved = 0
    stayed: dict[str, NhwcDenseConv2d] = {}  # measured faster on oneDNN alone
    if measured:
        x = costs.timing_input(state)
        for name, xin in costs.layer_inputs(gm, list(nodes), x).items():
            if not nhwc_serves(xin):
                continue
            conv = gm.get_submodule(name)
            cand = NhwcDenseConv2d(conv, costs.known_hw(costs.out_hw(nodes[name])))
            act = _activation_after(gm, nodes[name]) if cfg.fuse_epilogues else None
            with torch.no_grad():  # nhwc as the runner calls it (costs.in_program)
                times = costs.time_candidates({"onednn": lambda: act(conv(xin)) if act else conv(xin),
                                               "nhwc": costs.in_program(cand.prepared, xin)},
                                              cfg.latency_rounds)
            best = "nhwc" if times["nhwc"] < times["onednn"] else "onednn"
            records(nodes[name]).kernel = KernelChoice(
                strategy=best, cost_model="measured", times_ms={k: round(v, 4) for k, v in times.items()},
                batch_size=cfg.latency_batch_size, input_layout="channels_last")
            if best == "nhwc":
                replace_submodule(gm, name, cand)
                moved += 1
            else:
                stayed[name] = cand
        if stayed and _native_whole_model_faster(gm, state, x, stayed):
            for name, cand in stayed.items():
                replace_submodule(gm, name, cand)
                records(nodes[name]).kernel = dataclasses.replace(
                    records(nodes[name]).kernel, strategy="nhwc", cost_model="measured_whole_model")
            moved += len(stayed)
            state.notes.append(f"dense_kernels: {len(stayed)} convolution(s) that oneDNN ran faster "
                               "alone run on ispc's kernels: the whole model was faster so (its "
                               "native runs of layers longer)")
    else:
        for name, node in nodes.items():
            conv = gm.get_submodule(name)
            if kind_of(conv) in PREDICTED_KINDS:
                replace_submodule(gm, name, NhwcDenseConv2d(conv, costs.known_hw(costs.out_hw(node))))
                records(node).kernel = KernelChoice(strategy="nhwc", cost_model="predicted")
                moved += 1
    if moved:
        state.notes.append(f"dense_kernels: {moved} of {len(nodes)} dense convolution(s) on ispc's "
                           f"channels-last kernels ({'measured' if measured else 'predicted'})")
    return gm
