"""The eager backend's runner: a compiled model's channels-last layers in one native call.

A compiled model runs its FX graph one module call per layer. On a small model at batch 1 the
Python of those calls (module call, the fast path's checks, ctypes argument conversion: ~30 us a
layer) costs more than the kernels: MobileNetV2 on 16x16 inputs took 1.7 ms, of 5.5 ms at 224x224
(2-core Xeon). :class:`NativePlanRunner` finds the graph's leading run of layers that have native
channels-last kernels (the input's layout change, gated and dense ``nhwc`` convolutions, depthwise
3x3, max-pool, global average pool) and runs them as one :class:`~ispc.ops.native.OpProgram`: the
same C entries with the same arguments as the modules' own calls (the same results), maps in
buffers reused by liveness. The classifier after them (flatten, dropout, ``nn.Linear`` layers, a
ReLU after one fused into it, an adaptive pool that is the identity on the map) joins the program
(within float rounding of ``F.linear``: another summation order; ``classifier=False`` leaves it
to the graph). A linear reading a feature map or a ReLU's output skips its zero inputs with their
weight rows (``add_linear_input_major``: at batch 1 it is bound by reading its weights); one
right after a global average pool (averages, rarely zero) runs the blocked kernel. The rest of
the graph runs node by node; a graph that is one program is called without the graph module's
own Python.

It serves a call only when the per-layer path would take those kernels anyway: one positional
float32 CPU NCHW input, no autograd, no hooks, no profiler, no tracing or compiling; anything else
runs the graph module itself. Plans are built per input shape and rebuilt when a layer's gate
(mode, k, threshold), activation, prepared kernel or sums link changes; ispc's layers announce
changes through :func:`~ispc.modules.state_generation`, so a call reads their state only after one
(torch's own classifier layers are read every call).
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, fields
from functools import partial
from operator import attrgetter
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.nn.modules import module as _nn_module

from .compiled import DECLINED, CompiledModel
from .modules import (ACTIVATIONS, MODE_CODES, SALIENCY_CODES, ChannelsLastMaxPool2d, GatedConv2d,
                       GlobalAvgPool2d, NhwcDenseConv2d, StridedMaxPool2d, ToMemoryFormat,
                       Watched, Generation, plain_cpu_call, state_generation)
from .ops import gated_conv as _gc
from .ops import native

__all__ = ["NativePlanRunner", "runner_for"]

# read per call by NativePlanRunner.serve: module globals, not attribute chains through torch
_tracing_state = torch._C._get_tracing_state
_profiler_enabled = torch.autograd._profiler_enabled
_grad_enabled = torch.is_grad_enabled
_threads = torch.get_num_threads
_F32 = torch.float32
_STRIDED = torch.strided
_native_local = native._local

_LAYERS = (ToMemoryFormat, GatedConv2d, NhwcDenseConv2d, GlobalAvgPool2d, ChannelsLastMaxPool2d,
           StridedMaxPool2d)
_POOLS = (ChannelsLastMaxPool2d, StridedMaxPool2d)
#: layers whose output is a feature map that a classifier may flatten
_MAPS = (GatedConv2d, NhwcDenseConv2d, ChannelsLastMaxPool2d, StridedMaxPool2d)


_GATED_STATE = attrgetter("mode", "threshold", "k", "saliency", "act", "strategy", "_nhwc", "sums_in",
                          "sums_out")
_DENSE_STATE = attrgetter("act", "prepared", "sums_out")
_POOL_STATE = attrgetter("act", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                         "return_indices")


def _state_of(mod: nn.Module | None) -> Callable[[], tuple]:
    """What a layer's native call depends on besides its input, as a function of no arguments (a
    changed value: a new plan). Read on every call: C-level attribute getters, not per-call
    attribute lookups in Python (the caches are cold after a program has run)."""
    if type(mod) is GatedConv2d:
        bufs = mod._buffers  # the scale's id before it (a new tensor: unequal without comparing)
        return lambda: (_GATED_STATE(mod), id(bufs.get("scale")), bufs.get("scale"))
    if type(mod) is NhwcDenseConv2d:
        return partial(_DENSE_STATE, mod)
    if type(mod) is ToMemoryFormat:
        return partial(attrgetter("enabled", "channels_last"), mod)
    if type(mod) in _POOLS:
        return partial(_POOL_STATE, mod)
    if type(mod) is nn.AdaptiveAvgPool2d:
        return partial(attrgetter("output_size"), mod)
    if type(mod) is nn.Dropout:
        return partial(attrgetter("training", "p"), mod)
    if type(mod) is nn.Linear:  # the program may hold a packed copy: a changed weight, a new plan
        params = mod._parameters  # read per call after the program ran, its caches cold: a dict
        # lookup, not nn.Module.__getattr__ (a parametrized weight: not there, read as before)

        def linear() -> tuple:
            w, b = params.get("weight"), params.get("bias")
            if w is None or "bias" not in params:
                w, b = mod.weight, mod.bias
            # in place (a version) or a new tensor under .data
            # ids first: a new tensor differs there, before tuples compare tensors (ambiguous);
            # the tensors kept last hold the ids
            return (id(w), w._version, w.data_ptr(), id(b),
                    None if b is None else (b._version, b.data_ptr()), w, b)
        return linear
    return tuple


def _layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module" or node.kwargs or not node.args or not all(
            isinstance(a, fx.Node) for a in node.args):
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is GatedConv2d and mod.strategy != "nhwc":
        return None  # another kernel (NCHW, gather): the program stops before it, not at the build
    return mod if type(mod) in _LAYERS else None


_FLATTEN = (torch.ops.aten.flatten.using_ints, torch.flatten)
_DROPOUT = (torch.ops.aten.dropout.default,)
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default, torch.relu, torch.relu_,
         torch.nn.functional.relu)
_ADAPTIVE = (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten._adaptive_avg_pool2d.default,
             torch.nn.functional.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module ``node`` calls, or None (a function or method call)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _RELU) or type(_module(gm, node)) is nn.ReLU


def _is_adaptive(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An adaptive average pool (the identity on maps of its output size, as VGG's 7x7 one is
    at 224x224: checked per plan)."""
    return ((node.op == "call_function" and node.target in _ADAPTIVE)
            or type(_module(gm, node)) is nn.AdaptiveAvgPool2d)


def _adaptive_size(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    size = _module(gm, node).output_size if node.op == "call_module" else node.args[1]
    size = (size, size) if isinstance(size, int) or size is None else tuple(size)
    return None if len(size) != 2 or None in size else (int(size[0]), int(size[1]))


def _tail(gm: fx.GraphModule, node: fx.Node, run: list[fx.Node]) -> bool:
    """Whether ``node`` continues ``run`` as its classifier: a flatten of a global average pool's
    (N, C, 1, 1) output or of a feature map (after an adaptive pool that is the identity on it),
    inference dropouts, float32 ``nn.Linear`` layers after those, a ReLU after a linear."""
    if not run or not node.args or node.args[0] is not run[-1] or node.kwargs:
        return False
    prev = run[-1]
    prev_mod, mod = _module(gm, prev), _module(gm, node)
    if type(mod) is ToMemoryFormat:  # of an (N, C, 1, 1) map, of (N, F) features: no change
        return type(prev_mod) in (GlobalAvgPool2d, nn.Linear) and len(node.args) == 1
    if _is_adaptive(gm, node):  # of a feature map, before its flatten
        return type(prev_mod) in _MAPS and len(node.args) == (1 if mod is not None else 2)
    if node.op == "call_function" and node.target in _FLATTEN:
        return (type(prev_mod) in (GlobalAvgPool2d, ToMemoryFormat, *_MAPS)
                or _is_adaptive(gm, prev)) and tuple(node.args[1:]) in ((1,), (1, -1))
    if _is_relu(gm, node):  # fused into the linear op before it
        return type(prev_mod) is nn.Linear and len(node.args) == 1
    flat = _is_tail(gm, prev) and not _is_adaptive(gm, prev)  # (N, F) features
    if node.op == "call_function" and node.target in _DROPOUT:
        return flat and len(node.args) == 3 and node.args[2] is False
    if type(mod) is nn.Dropout:  # served in eval mode only (_build)
        return flat and len(node.args) == 1
    if node.op == "call_module" and len(node.args) == 1 and flat:
        return (type(mod) is nn.Linear and mod.weight.dtype == torch.float32
                and (mod.bias is None or mod.bias.dtype == torch.float32))
    return False


def _is_tail(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A classifier's flatten, dropout, ReLU (fused into the linear op before it) or adaptive
    pool (the identity), none an op of its own."""
    if _is_relu(gm, node) or _is_adaptive(gm, node) or type(_module(gm, node)) is nn.Dropout:
        return True
    return node.op == "call_function" and node.target in _FLATTEN + _DROPOUT


def _segments(gm: fx.GraphModule, classifier: bool = True) -> list[list[fx.Node]]:
    """The runs (two or more) of consecutive native layers that each read one value from before
    them (the first layer's only input, which later layers may read too; a layout change comes
    first or not at all) and whose values are used only inside them, but for the last one's; with
    ``classifier``, a run ending in a global average pool goes on through the classifier after it
    (flatten, dropout, linear: :func:`_tail`)."""
    runs: list[list[fx.Node]] = []
    run: list[fx.Node] = []
    tail = False  # the run is in its classifier: no more feature layers
    for node in gm.graph.nodes:
        mod = _layer(gm, node)
        if run and not tail and mod is not None and type(mod) is not ToMemoryFormat and all(
                a in run or a is run[0].args[0] for a in node.args):
            run.append(node)
            continue
        if classifier and _tail(gm, node, run):
            run.append(node)
            tail = True
            continue
        runs.append(_trimmed(gm, run))
        run, tail = [node] if mod is not None and len(node.args) == 1 else [], False
    runs.append(_trimmed(gm, run))
    return [r for r in runs if len(r) >= 2]


def _aliases(gm: fx.GraphModule, node: fx.Node, i: int) -> bool:
    """Whether a program's ``i``-th layer ``node`` is a classifier's step that only passes its
    input on (a flatten, a dropout, a layout change of an (N, C, 1, 1) map)."""
    return _is_tail(gm, node) or (i > 0 and type(_module(gm, node)) is ToMemoryFormat)


def _trimmed(gm: fx.GraphModule, run: list[fx.Node]) -> list[fx.Node]:
    run = list(run)
    linear = lambda: any(type(_module(gm, n)) is nn.Linear for n in run)  # noqa: E731
    while run and (any(u not in run for n in run[:-1] for u in n.users)
                   or (_aliases(gm, run[-1], len(run) - 1) and not linear())):
        run.pop()
    return run


def _after_global_pool(gm: fx.GraphModule, seg: list[fx.Node], i: int) -> bool:
    """Whether linear layer ``seg[i]`` reads a global average pool's output (through aliases)."""
    node = seg[i].args[0]
    while node in seg and _aliases(gm, node, seg.index(node)):
        node = node.args[0]
    return node in seg and type(_module(gm, node)) is GlobalAvgPool2d


def _input_major(mod: nn.Linear) -> Tensor:
    """``mod``'s weight input-major, (in, out) contiguous; the module's weight becomes its
    transposed view where it was not one already (one copy of a weight that may be 400 MB;
    ``F.linear`` takes the view as it is)."""
    weight = mod.weight
    if not weight.t().is_contiguous():
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
    return weight.detach().t()


class _Plan:
    """One input shape's program: the ops, their buffers, the slots' pointers."""

    def __init__(self, program: native.OpProgram, slots, out_shape, out_slot: int,
                 buffers: list[Tensor], spans: list[tuple[int, int]]) -> None:
        self.program, self.slots, self.spans = program, slots, spans  # spans: each op's layers
        self.out_shape, self.out_slot, self.buffers = out_shape, out_slot, buffers
        self.out: Tensor | None = None  # the output map, where it is kept across calls
        #: a fresh output tensor (channels-last where it is a 4-D map)
        self.empty = (partial(torch.empty, out_shape, dtype=torch.float32) if len(out_shape) != 4
                      else partial(torch.empty, out_shape, dtype=torch.float32,
                                   memory_format=torch.channels_last))
        self.entry = program.entry()  # the C call's function, ops and count (serve calls it)
        self.lib = native._lib  # the library ``entry`` is bound to: serve declines once it changes


class _Program(nn.Module):
    """One run of native layers as one node of the runner's graph: its program where it serves
    the input, else its layers one by one (a graph module of that run alone)."""

    def __init__(self, gm: fx.GraphModule, seg: list[fx.Node]) -> None:
        super().__init__()
        self._seg = seg
        # None for a classifier's flatten and dropout (functions)
        self._mods = [_module(gm, n) for n in seg]
        self._alias = [_aliases(gm, n, i) for i, n in enumerate(seg)]  # no op of their own
        self._states = [_state_of(m) for m in self._mods]
        #: the states no generation covers (torch's own modules: dropout, linear), read per call
        self._foreign = [f for m, f in zip(self._mods, self._states)
                         if not isinstance(m, Watched) and f is not tuple]
        #: (shape, strides, generation, foreign states, plan) of the last planned input (kept
        #: while _plans is not cleared)
        self._last: tuple | None = None
        self._served = False  # whether a runner serves calls through it (sets _last)
        self._src = seg[0].args[0]
        self.__dict__["_gm"] = gm
        #: the linear layers run on input-major weights, zero inputs skipped: all but those right
        #: after a global average pool (averages, rarely zero: the blocked kernel, unless a ReLU
        #: after them is to be fused)
        self._input_major = {i for i, m in enumerate(self._mods) if type(m) is nn.Linear and (
            not _after_global_pool(gm, seg, i) or (i + 1 < len(seg) and _is_relu(gm, seg[i + 1])))}
        self._plans: dict[tuple, tuple[tuple, _Plan | None]] = {}  # shape -> (state, plan)
        #: shape -> (generation, foreign state) when its plan's state was last found current
        #: (the generation read before the state)
        self._seen: dict[tuple, tuple[int, list]] = {}
        #: write the output into a buffer kept across calls (the runner sets it where the output
        #: is read only by layers that return new tensors: it never reaches the caller)
        self.keep_output = False
        g = fx.Graph()
        env = {self._src: g.placeholder("x")}
        for node in seg:
            env[node] = g.node_copy(node, env.__getitem__)
        g.output(env[seg[-1]])
        self.__dict__["_layers"] = fx.GraphModule(_root(gm, g), g)  # not a registered submodule

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan(x)
        if plan is None:
            return self._layers(x)
        out = plan.out
        if out is None:
            # a large fresh map is a memory map of its own, page-faulted on every call: kept
            # across calls where it never reaches the caller
            out = (torch.empty(plan.out_shape, dtype=torch.float32) if len(plan.out_shape) != 4
                   else torch.empty(plan.out_shape, dtype=torch.float32,
                                    memory_format=torch.channels_last))
            if self.keep_output:
                plan.out = out
        slots = plan.slots
        slots[0] = x.data_ptr()
        slots[plan.out_slot] = out.data_ptr()
        plan.program.run(slots)
        return out

    def _plan(self, x: Any) -> _Plan | None:
        """The plan for the program's input ``x``, or None where the per-layer path must run."""
        if not (type(x) is Tensor and x.dtype == torch.float32 and x.dim() == 4 and x.is_cpu
                and not x.requires_grad):
            return None
        if type(self._mods[0]) is ToMemoryFormat:
            if not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
                return None
        elif not x.is_contiguous(memory_format=torch.channels_last):
            return None
        shape, gen = tuple(x.shape), state_generation()
        seen = (gen, [f() for f in self._foreign])
        known = self._plans.get(shape)
        if known is not None and self._seen.get(shape) == seen:
            self._remember(x, seen, known[1])
            return known[1]
        key = (shape, *[f() for f in self._states])
        if known is not None and known[0] == key:
            self._seen[shape] = seen
            self._remember(x, seen, known[1])
            return known[1]
        plan = self._build(shape)
        # a build may make a linear input-major (its weight a new view): the states after it
        key = (shape, *[f() for f in self._states])
        seen = (gen, [f() for f in self._foreign])
        if len(self._plans) > 8:
            self._plans.clear()
            self._seen.clear()
        self._plans[shape] = (key, plan)
        self._seen[shape] = seen
        self._remember(x, seen, plan)
        return plan

    def _remember(self, x: Tensor, seen: tuple[int, list], plan: _Plan | None) -> None:
        """Keep ``plan`` as the one :meth:`NativePlanRunner.serve` checks first: for inputs of
        ``x``'s shape and strides (its layout checks passed), while the generation and the
        foreign states are ``seen``'s."""
        if self._served:
            if plan is not None and plan.lib is not native._lib:  # A/Bs swap builds per call
                plan.entry, plan.lib = plan.program.entry(), native._lib
            self._last = None if plan is None else (tuple(x.shape), x.stride(), *seen, plan)

    def _build(self, xshape: tuple[int, ...]) -> _Plan | None:
        """The program for inputs of ``xshape``; None where some layer would not take its native
        kernel on them (the per-layer path then runs, with its own checks and messages)."""
        if type(self._mods[0]) is ToMemoryFormat and any(
                self._src in node.args for node in self._seg[1:]):
            return None  # later layers would read the NCHW input as channels-last
        prog = _Calls()
        shapes: dict[fx.Node, tuple[int, int, int, int]] = {self._src: xshape}
        slot_of: dict[fx.Node, int] = {self._src: 0}
        sums_slot: dict[fx.Node, int] = {}  # a producer's sums buffer
        producer: dict[fx.Node, nn.Module] = {}
        n_slots = 1
        sizes: dict[int, int] = {}  # slot -> floats (maps and sums)
        seg = self._seg
        last_use = {n: max([i for i, m in enumerate(seg) if n in m.args], default=i)
                    for i, n in enumerate(seg)}
        tail_first = -1  # the classifier's flatten: the first layer of its linear op
        for i, (node, mod) in enumerate(zip(seg, self._mods)):
            prog.node = prog.first = i
            src = node.args[0]
            n, c, h, w = shapes[src]
            if self._alias[i]:  # a classifier's flatten, dropout, ReLU, layout: no op
                if type(mod) is nn.Dropout and mod.training and mod.p > 0:
                    return None
                if _is_adaptive(self._gm, node) and _adaptive_size(self._gm, node) != (h, w):
                    return None  # an adaptive pool that is not the identity here
                tail_first = i if tail_first < 0 else tail_first
                shapes[node], slot_of[node] = shapes[src], slot_of[src]
                continue
            if type(mod) is nn.Linear:
                if c * h * w != mod.in_features or not mod.weight.is_cpu or (
                        mod.bias is not None and not mod.bias.is_cpu):
                    return None
                out_slot, n_slots = n_slots, n_slots + 1
                prog.first, tail_first = tail_first, -1
                relu = i + 1 < len(seg) and _is_relu(self._gm, seg[i + 1])  # fused
                if i in self._input_major:
                    weight_t = _input_major(mod)
                    bias = None if mod.bias is None else mod.bias.detach().contiguous()
                    prog.add_linear_input_major(weight_t, bias, slot_of[src], out_slot, (n, c, h, w),
                                                native.RELU if relu else native.NO_CLAMP)
                elif (h, w) != (1, 1) or relu:
                    return None
                else:
                    prog.add_linear(mod.weight, mod.bias, slot_of[src], out_slot, n)
                oshape = (n, mod.out_features, 1, 1)
                shapes[node], slot_of[node] = oshape, out_slot
                sizes[out_slot] = n * mod.out_features
                continue
            res_node = node.args[1] if len(node.args) > 1 else None
            if len(node.args) > 2 or (res_node is not None and type(mod) not in (
                    GatedConv2d, NhwcDenseConv2d)):
                return None
            out_slot, n_slots = n_slots, n_slots + 1
            if type(mod) is ToMemoryFormat:
                if not (mod.enabled and mod.channels_last and 1 < c <= native.TO_CHANNELS_LAST_MAX):
                    return None
                prog.add_to_channels_last(0, out_slot, (n, c, h, w))
                oshape = (n, c, h, w)
            elif type(mod) is GlobalAvgPool2d:
                if h * w == 0:
                    return None
                prog.add_avgpool_global(slot_of[src], out_slot, (n, c, h, w))
                oshape = (n, c, 1, 1)
            elif type(mod) in _POOLS:
                window = mod.native_window(h, w)
                if window is None:
                    return None
                (kh, kwd), stride, (ph, pw) = window
                prog.add_maxpool(slot_of[src], out_slot, (n, c, h, w), *window, ACTIVATIONS[mod.act])
                oshape = (n, c, (h + 2 * ph - kh) // stride[0] + 1, (w + 2 * pw - kwd) // stride[1] + 1)
            else:
                if type(mod) is GatedConv2d:
                    kern, scale = mod._nhwc, mod._buffers.get("scale")
                    if (kern is None or mod.strategy != "nhwc" or c != kern.cin or scale is None
                            or scale.dtype != torch.float32 or not scale.is_contiguous()):
                        return None
                    cout = kern.cout
                    oh, ow = kern.out_size(h, w)
                else:
                    kern, cout = mod.prepared, mod.out_channels
                    if c != mod.in_channels:
                        return None
                    oh, ow = mod.out_size(h, w)
                oshape = (n, cout, oh, ow)
                if oh < 1 or ow < 1:
                    return None
                res = -1
                if res_node is not None:
                    if shapes[res_node] != oshape:
                        return None
                    res = slot_of[res_node]
                sums_out, sums_kind, link = -1, 0, mod.sums_out
                if link is not None:
                    sums_out, n_slots = n_slots, n_slots + 1
                    sizes[sums_out] = n * cout
                    sums_kind = link.kind
                    sums_slot[node] = sums_out
                clamp = ACTIVATIONS[mod.act]
                if type(mod) is GatedConv2d:
                    mode = MODE_CODES[mod.mode]
                    if _gc.kept_all(mode, mod.threshold, mod.k, mod.in_channels):
                        mode = native.DENSE
                    sal = SALIENCY_CODES[mod.saliency]
                    sums_in = -1
                    if (mode != native.DENSE and mod.sums_in is not None and src in producer
                            and producer[src].sums_out is mod.sums_in and mod.sums_in.kind == sal):
                        sums_in = sums_slot[src]
                    prog.add_conv(layer=kern, x=slot_of[src], out=out_slot, shape=(n, c, h, w),
                                  mode=mode, scale=scale, threshold=mod.threshold, k=mod.k,
                                  saliency=sal, res=res, clamp=clamp, sums_in=sums_in,
                                  sums_out=sums_out, sums_kind=sums_kind)
                elif mod.groups > 1:
                    prog.add_depthwise(layer=kern, x=slot_of[src], out=out_slot, shape=(n, c, h, w),
                                       res=res, clamp=clamp, sums_out=sums_out, sums_kind=sums_kind)
                else:
                    prog.add_conv(layer=kern, x=slot_of[src], out=out_slot, shape=(n, c, h, w),
                                  mode=native.DENSE, scale=None, threshold=0.0, k=0, saliency=0,
                                  res=res, clamp=clamp, sums_in=-1, sums_out=sums_out,
                                  sums_kind=sums_kind)
                producer[node] = mod
            shapes[node], slot_of[node] = oshape, out_slot
            sizes[out_slot] = oshape[0] * oshape[1] * oshape[2] * oshape[3]
        # the expansions worth fusing with their depthwise layer: those whose expanded map
        # (per pass: a chunk, or the batch) is large, as the layers would run unfused
        per_layer = _chunks([shapes[n.args[0]] for n in seg], [shapes[n] for n in seg])
        fuse = {i for i, n in enumerate(seg) if 4 * (per_layer[i] or shapes[n][0]) * math.prod(
            shapes[n][1:]) >= FUSE_BYTES} if os.environ.get("ISPC_FUSE_DW", "1") != "0" else set()
        # the others on small maps fuse split by channels
        small = int(os.environ.get("ISPC_FUSE_CH_POSITIONS", FUSE_CH_POSITIONS))
        by_channels = {i for i, n in enumerate(seg) if i not in fuse
                       and shapes[n][2] * shapes[n][3] <= small}
        calls = prog
        prog, spans = calls.emit(seg, fuse, by_channels)
        if all(self._alias[i] for i in range(spans[-1][1] + 1, len(seg))):
            spans[-1] = (spans[-1][0], len(seg) - 1)  # a layout step after the classifier
        # spans: each op's first and last layer (two for a fused expansion + depthwise)
        op_of = {i: j for j, (a, b) in enumerate(spans) for i in range(a, b + 1)}
        chunks = _chunks([shapes[seg[a].args[0]] for a, _ in spans], [shapes[seg[b]] for _, b in spans])
        runs = _runs(chunks)  # op -> (first, last) op of its chunked run (itself where none)
        # a map made and read inside one chunked run holds one chunk (its buffer stays in cache)
        # the maps the ops write (a fused op's expanded map is never written)
        made = {seg[b]: j for j, (_, b) in enumerate(spans) if b < len(seg) - 1}
        for j in calls.pairs:  # a pair's first map: written where the pair does not fuse
            made[seg[spans[j][0]]] = j
        used = {node: op_of[last_use[node]] for node in made}
        local = {node for node, j in made.items() if chunks[j] and runs[used[node]][0] == runs[j][0]}
        for j, (a, b) in enumerate(spans):
            node = seg[b]
            names = [k for k, v in (("x", seg[a].args[0]), ("out", node),
                                    ("res", node.args[1] if len(node.args) > 1 else None),
                                    ("x2", node.args[0] if j in calls.pairs else None))
                     if v in local]
            prog.set_chunk(j, chunks[j], tuple(names))
        # buffers: the last op's output is the caller's fresh tensor; every other map shares a
        # buffer with maps whose lives do not overlap (a map read or written in a chunked run
        # lives through the whole run, but for one local to it); sums get their own
        slots = native.OpProgram.slot_array(n_slots)
        life = {node: (j, used[node]) if node in local else (runs[j][0], runs[used[node]][1])
                for node, j in made.items()}
        over = self._overwrites(calls.pairs, spans, made, local, life)
        free: list[Tensor] = []
        buffers: list[Tensor] = []
        live: dict[fx.Node, Tensor] = {}
        for t in range(len(spans)):
            for done in [m for m in live if life[m][1] < t]:
                free.append(live.pop(done))
            born = [m for m, j in made.items() if life[m][0] == t]
            for node in [m for m in born if m not in over] + [m for m in born if m in over]:
                if node in over:  # the buffer of the map it overwrites
                    other = over[node]
                    if other in made and life[other][1] == t:  # a residual read last here
                        live[node] = live.pop(other)
                    slots[slot_of[node]] = slots[slot_of[other]]  # else a pair's first map
                    continue
                need = sizes[slot_of[node]]
                if node in local:
                    need = need // shapes[node][0] * chunks[made[node]]
                fits = [j for j, b in enumerate(free) if b.numel() >= need]
                if fits:
                    buf = free.pop(min(fits, key=lambda j: free[j].numel()))
                else:
                    buf = torch.empty(need, dtype=torch.float32)
                    buffers.append(buf)
                live[node] = buf
                slots[slot_of[node]] = buf.data_ptr()
        for node, s in sums_slot.items():
            buf = torch.empty(max(sizes[s], 1), dtype=torch.float32)
            buffers.append(buf)
            slots[s] = buf.data_ptr()
        huge = (native.empty_on_huge_pages([b.numel() for b in buffers])
                if xshape[0] <= _huge_maps_max_batch() else None)
        if huge is not None:  # the same buffers, on 2 MiB pages
            moved = {b.data_ptr(): h.data_ptr() for b, h in zip(buffers, huge)}
            for i in range(n_slots):
                slots[i] = moved.get(slots[i], slots[i])
            buffers = huge
        out_shape = shapes[seg[-1]]
        if any(type(m) is nn.Linear for m in self._mods):
            out_shape = out_shape[:2]
        return _Plan(prog, slots, out_shape, slot_of[seg[-1]], buffers, spans)

    def _overwrites(self, pairs: set[int], spans: list[tuple[int, int]], made: dict[fx.Node, int],
                    local: set[fx.Node], life: dict[fx.Node, tuple[int, int]]
                    ) -> dict[fx.Node, fx.Node]:
        """The maps written into the buffer of another map of their shape: a convolution's output
        into its residual's where that is the residual's last read (the epilogue reads each
        element's residual before it stores the element, in the same thread), and a pair's first
        map into the pair's output (the second layer reads it as its residual alone; fused, it is
        never written). One buffer fewer per ResNet stage, and the block's output written into
        lines the call has just read instead of lines that come from DRAM."""
        over: dict[fx.Node, fx.Node] = {}
        if not _inplace():
            return over
        for j, (a, b) in enumerate(spans):
            node = self._seg[b]
            if node not in made:
                continue
            if j in pairs:  # (a chunk's buffers both, or the batch's both)
                first = self._seg[a]
                if first in made and (first in local) == (node in local):
                    over[first] = node
                continue
            res = node.args[1] if len(node.args) > 1 else None
            mod = self._mods[b]
            if (a == b and res in made and (res in local) == (node in local)
                    and res is not node.args[0] and getattr(mod, "groups", 1) == 1
                    and type(mod) in (GatedConv2d, NhwcDenseConv2d)
                    and life[res][1] == j == life[node][0]):
                over[node] = res
        return over


def _nhwc_kernel(m: nn.Module) -> native.NhwcConv | None:
    """The channels-last kernel a program's layer runs (its weights go on 2 MiB pages), or None."""
    k = (getattr(m, "_nhwc", None) if type(m) is GatedConv2d
         else getattr(m, "prepared", None) if type(m) is NhwcDenseConv2d else None)
    return k if isinstance(k, native.NhwcConv) else None


#: the largest batch whose plans put their maps on 2 MiB pages (``ISPC_HUGE_MAPS_MAX_BATCH``
#: overrides): at batch 32 the maps are streamed, few TLB misses to save, and on a 512 KiB-L2 Zen 3
#: ResNet-50 ran slower with them there (docs/benchmarks.md, seventeenth session)
HUGE_MAPS_MAX_BATCH = 1


def _huge_maps_max_batch() -> int:
    try:
        return int(os.environ.get("ISPC_HUGE_MAPS_MAX_BATCH", "") or HUGE_MAPS_MAX_BATCH)
    except ValueError:
        return HUGE_MAPS_MAX_BATCH


def _inplace() -> bool:
    return os.environ.get("ISPC_INPLACE", "1") != "0"


class _Recorded:
    """A recorded ``OpProgram.<METHOD>`` call whose fields are the method's keyword arguments."""
    METHOD = ""

    def add(self, prog: native.OpProgram) -> None:
        getattr(prog, self.METHOD)(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True, kw_only=True)
class _Conv(_Recorded):
    """A recorded :meth:`~ispc.ops.native.OpProgram.add_conv` call, by name."""
    METHOD = "add_conv"
    layer: native.NhwcConv
    x: int
    out: int
    shape: tuple[int, int, int, int]
    mode: int
    scale: Tensor | None
    threshold: float
    k: int
    saliency: int
    res: int
    clamp: tuple[float, float]
    sums_in: int
    sums_out: int
    sums_kind: int


@dataclass(frozen=True, kw_only=True)
class _Depthwise(_Recorded):
    """A recorded :meth:`~ispc.ops.native.OpProgram.add_depthwise` call, by name."""
    METHOD = "add_depthwise"
    layer: native.DepthwiseConv3x3
    x: int
    out: int
    shape: tuple[int, int, int, int]
    res: int
    clamp: tuple[float, float]
    sums_out: int
    sums_kind: int


@dataclass(frozen=True)
class _Other:
    """Any other recorded ``add_*`` call (pools, the layout change): made as recorded."""
    name: str
    args: tuple

    def add(self, prog: native.OpProgram) -> None:
        getattr(prog, self.name)(*self.args)


class _Calls:
    """The ``add_*`` calls of a program as they are made (``node``: the layer they are for), as
    named records, for :meth:`emit` to fuse where it can and make them on an
    :class:`~ispc.ops.native.OpProgram`."""

    def __init__(self) -> None:
        self.node = self.first = -1  # the layers [first, node] of the calls being recorded
        self.calls: list[tuple[int, int, _Conv | _Depthwise | _Other]] = []
        self.pairs: set[int] = set()  # the ops emit made of two summed convolutions

    def _record(self, call: _Conv | _Depthwise | _Other) -> None:
        self.calls.append((self.first, self.node, call))

    def add_conv(self, **fields: Any) -> None:
        self._record(_Conv(**fields))

    def add_depthwise(self, **fields: Any) -> None:
        self._record(_Depthwise(**fields))

    def __getattr__(self, name: str):
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda *args: self._record(_Other(name, args))

    def emit(self, seg: list[fx.Node], fuse: set[int],
             by_channels: frozenset[int] | set[int] = frozenset()
             ) -> tuple[native.OpProgram, list[tuple[int, int]]]:
        """The program, and each op's first and last layer. A convolution in ``fuse`` (a 1x1
        of stride 1 without padding, or one whose rows ``expand_dw_fits``; no residual, no sums
        handed on) whose only reader is the depthwise layer after it (no residual) becomes one op
        with it (``add_expand_dw``); a 1x1 in ``by_channels`` alone too, its threads splitting
        the expanded channels. A dense convolution whose only reader is a max-pool becomes one
        op with the pool (``add_conv_maxpool``). A 1x1 convolution whose only reader is the next
        one, as its residual (a ResNet block's last 1x1 and its downsample), becomes one op with
        it (``add_conv_pair``; ``pairs`` holds those ops)."""
        prog = native.OpProgram()
        spans: list[tuple[int, int]] = []
        calls = self.calls
        j = 0
        while j < len(calls):
            first, i, call = calls[j]
            nxt = calls[j + 1] if j + 1 < len(calls) else None
            if (nxt is not None and isinstance(call, _Conv) and isinstance(nxt[2], _Conv)
                    and _pair_fusable(seg, i, call, nxt[2])):
                b = nxt[2]
                prog.add_conv_pair(call.layer, b.layer, call.x, b.x, call.out, b.out, call.shape,
                                   b.shape, call.mode, call.scale, call.threshold, call.k,
                                   call.saliency, call.sums_in, b.mode, b.scale, b.threshold, b.k,
                                   b.saliency, b.sums_in, clamp=b.clamp, sums_out=b.sums_out,
                                   sums_kind=b.sums_kind)
                self.pairs.add(len(spans))
                spans.append((first, nxt[1]))
                j += 2
                continue
            split = (i not in fuse and i in by_channels and isinstance(call, _Conv)
                     and native.pointwise(call.layer))
            if ((i in fuse or split) and nxt is not None and isinstance(call, _Conv)
                    and isinstance(nxt[2], _Depthwise) and _fusable(seg, i, call, nxt[2])):
                dw = nxt[2]
                prog.add_expand_dw(call.layer, dw.layer, call.x, dw.out, call.shape, call.mode,
                                   call.scale, call.threshold, call.k, call.saliency, call.clamp,
                                   dw.clamp, -1, call.sums_in, dw.sums_out, dw.sums_kind,
                                   by_channels=split)
                spans.append((first, nxt[1]))
                j += 2
                continue
            if (nxt is not None and isinstance(call, _Conv) and isinstance(nxt[2], _Other)
                    and _pool_fusable(seg, i, call, nxt[2])):
                _, out, _, kernel, stride, padding, pool_clamp = nxt[2].args
                prog.add_conv_maxpool(call.layer, call.x, out, call.shape, kernel, stride, padding,
                                      call.clamp, pool_clamp)
                spans.append((first, nxt[1]))
                j += 2
                continue
            call.add(prog)
            spans.append((first, i))
            j += 1
        return prog, spans


def _fusable(seg: list[fx.Node], i: int, conv: _Conv, dw: _Depthwise) -> bool:
    """Whether layer ``i``'s ``add_conv`` call and layer ``i + 1``'s ``add_depthwise`` one make
    one ``add_expand_dw``."""
    layer = conv.layer
    return (i + 1 < len(seg) and set(seg[i].users) == {seg[i + 1]} and dw.x == conv.out
            and dw.res == -1 and conv.res == -1 and conv.sums_out == -1
            and (native.pointwise(layer) or native.expand_dw_fits(layer, conv.shape[2]))
            and dw.layer.channels == layer.cout)


def _pair_fusable(seg: list[fx.Node], i: int, a: _Conv, b: _Conv) -> bool:
    """Whether layer ``i``'s ``add_conv`` call and layer ``i + 1``'s make one ``add_conv_pair``:
    two 1x1 layers without padding, the first's map read only by the second, as its residual
    alone, the first with no clamp and no sums handed on."""
    def plain(layer: native.NhwcConv) -> bool:
        return layer.kernel == (1, 1) and layer.padding == (0, 0) and layer.dilation == (1, 1)
    return (i + 1 < len(seg) and set(seg[i].users) == {seg[i + 1]} and b.res == a.out
            and b.x != a.out and a.res == -1 and a.sums_out == -1 and a.clamp == native.NO_CLAMP
            and plain(a.layer) and plain(b.layer) and a.layer.cout == b.layer.cout
            and os.environ.get("ISPC_FUSE_PAIR", "1") != "0")


def _pool_fusable(seg: list[fx.Node], i: int, conv: _Conv, pool: _Other) -> bool:
    """Whether layer ``i``'s dense ``add_conv`` call and layer ``i + 1``'s ``add_maxpool`` one
    make one ``add_conv_maxpool`` (its conv map never written: ResNet's stem)."""
    return (pool.name == "add_maxpool" and i + 1 < len(seg) and set(seg[i].users) == {seg[i + 1]}
            and pool.args[0] == conv.out and conv.mode == native.DENSE and conv.res == -1
            and conv.sums_out == -1 and pool.args[3][0] <= native.CONV_MAXPOOL_ROWS
            and os.environ.get("ISPC_FUSE_POOL", "1") != "0")


#: the expanded maps (bytes per pass) that a 1x1 expansion and its depthwise layer fuse for: per
#: MobileNetV2 block at batch 1 (2-core Xeon) fused ran 0.78x the two ops at 112x112, 0.90x at
#: 56x56 stride 1, 0.86-1.0x at 28x28, 1.0x at 14x14 and 1.1-1.2x at 7x7 (each thread reads all
#: of the expansion's weights); at batch 32 (chunks of 1-8 instances) 0.67-0.93x everywhere
FUSE_BYTES = 512 << 10

#: the expanded maps' positions (at most) whose expansion and depthwise layer, where
#: :data:`FUSE_BYTES` does not fuse them, fuse with threads splitting the channels
#: (``add_expand_dw(by_channels=True)``): MobileNetV2's 7x7 blocks (see docs/benchmarks.md)
FUSE_CH_POSITIONS = 49

#: bytes of the maps an op reads and writes per chunk that a chunked run aims at: at batch 32
#: MobileNetV2's 112x112 and 56x56 layers ran 2-2.5x their batch-1 time per image, their maps
#: (50-150 MB) streamed through memory between layers
CHUNK_BYTES = 2 << 20


def _chunks(ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> list[int]:
    """Each op's instances per pass (0: the whole batch): the largest power of two whose input
    and output maps fit :data:`CHUNK_BYTES` (at least one), never fewer than the op before
    (runs of equal chunks: the maps between them stay in cache)."""
    budget = int(os.environ.get("ISPC_CHUNK_BYTES", CHUNK_BYTES))
    chunks, prev = [], 1
    for xs, os_ in zip(ins, outs):
        n = xs[0]
        per = 4 * (math.prod(xs[1:]) + math.prod(os_[1:]))
        m = 1
        while m * 2 * per <= budget and m * 2 < n:
            m *= 2
        m = max(m, prev)
        prev = m
        chunks.append(0 if budget <= 0 or m >= n or n <= 1 else m)
    return chunks


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Each op's chunked run: (first, last) op of the consecutive ops with its chunk, or (i, i)
    for an op that runs the whole batch at once (as ``ispc_run_ops`` groups them)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(chunks):
        j = i + 1
        if chunks[i]:
            while j < len(chunks) and chunks[j] == chunks[i]:
                j += 1
        runs += [(i, j - 1)] * (j - i) if chunks[i] else [(i, i)]
        i = j
    return runs


def _reads_only(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` only reads ``value`` and returns a new tensor (never ``value``, a view of
    it, or ``value`` written in place): a native layer or another program, ``value`` a positional
    argument."""
    if user.op != "call_module" or value in user.kwargs.values():
        return False
    mod = gm.get_submodule(user.target)
    return type(mod) in (_Program, GatedConv2d, NhwcDenseConv2d, GlobalAvgPool2d,
                         ChannelsLastMaxPool2d, StridedMaxPool2d)


def _root(gm: fx.GraphModule, g: fx.Graph, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What graph ``g`` (nodes copied from ``gm``'s) refers to, by name: ``gm``'s own objects
    (and ``extra``'s)."""
    root: dict[str, Any] = dict(extra or {})
    for node in g.nodes:
        if node.op == "call_module" and node.target not in root:
            root[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            root[node.target] = obj
    return root


class NativePlanRunner:
    """``compiled.forward``'s runner on the eager backend (see the module docstring): a copy of
    the graph with each run of native layers one :class:`_Program` node, the same modules."""

    def __init__(self, gm: fx.GraphModule, classifier: bool = True) -> None:
        self.gm = gm
        self.classifier = classifier
        self._code = gm.code
        #: read per call in grad mode: walking gm.parameters() took ~170 us on MobileNetV2
        self._params = list(gm.parameters())
        segs = _segments(gm, classifier)
        self._programs = [_Program(gm, seg) for seg in segs]
        self._mods = [m for p in self._programs for m in p._mods if m is not None]
        native.move_to_huge_pages([k for k in map(_nhwc_kernel, self._mods) if k is not None])
        #: torch's own layers (no generation: their hooks are looked up per call)
        self._foreign = [m for m in self._mods if not isinstance(m, Watched)]
        self._hookless = -1  # the generation at which no layer had a hook
        first = {seg[0]: i for i, seg in enumerate(segs)}
        inside = {n for seg in segs for n in seg}
        g = fx.Graph()
        g.set_codegen(gm.graph._codegen)
        env: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            if node in first:
                seg = segs[first[node]]
                env[seg[-1]] = g.call_module(f"ispc_program_{first[node]}", (env[seg[0].args[0]],))
            elif node not in inside:
                env[node] = g.node_copy(node, env.__getitem__)
        programs = {f"ispc_program_{i}": p for i, p in enumerate(self._programs)}
        self._fast = fx.GraphModule(_root(gm, g, programs), g) if segs else None
        if self._fast is not None:
            for node in self._fast.graph.nodes:
                if node.op == "call_module" and node.target in programs:
                    programs[node.target].keep_output = bool(node.users) and all(
                        _reads_only(self._fast, u, node) for u in node.users)
        #: the one program, where the graph is that program alone (called without the graph
        #: module's own Python: argument flattening, module calls)
        self._direct = None
        if self._fast is not None:
            nodes = list(self._fast.graph.nodes)
            if ([n.op for n in nodes] == ["placeholder", "call_module", "output"]
                    and nodes[1].args == (nodes[0],) and _plain_io(self._fast, nodes[1])):
                self._direct = self._fast.get_submodule(nodes[1].target)
                self._direct._served = True
        self._lock = threading.Lock()
        self._gm_vars = vars(gm)  # its code read per call without the property's Python

    def __reduce__(self):  # copies and pickles: a runner of the copied graph module
        return (type(self), (self.gm, self.classifier))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fast is not None and self._eligible() and self._lock.acquire(blocking=False):
            try:
                if self._direct is not None and len(args) == 1 and not kwargs:
                    # its forward itself: no hook can be on the program (it is the runner's own
                    # module, and _eligible found no global one), and after the program's last call
                    # every Python line runs on cold caches (~1-3 us each)
                    return self._direct.forward(args[0])
                return self._fast(*args, **kwargs)
            finally:
                self._lock.release()
        return self.gm(*args, **kwargs)

    def serve(self, owner: nn.Module, x: Any) -> Any:
        """``owner(x)`` for the compiled model ``owner`` whose runner this is (its
        ``nn.Module.__call__``, ``forward`` and this runner's call in one), where the graph is one
        program and nothing has changed since its last call: no hooks (``owner``'s, global, the
        layers'), no grad, tracing or profiler, ``x`` of the last call's dtype, device, shape and
        strides, the same generation, foreign states and native library; else
        :data:`~ispc.compiled.DECLINED` (the caller then takes the full path, which re-checks
        everything and rebinds the program to a swapped library). The caller has checked
        ``torch.compiler.is_compiling()``. After a program has run every object and line a call
        touches is a cache miss, so this is one function that reads few of them."""
        prog = self._direct
        if (prog is None or type(x) is not Tensor or owner._compiled_call_impl is not None
                or owner._forward_hooks or owner._forward_pre_hooks or owner._backward_hooks
                or owner._backward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks
                or _nn_module._global_backward_pre_hooks
                or _nn_module._global_forward_hooks_always_called
                or _tracing_state() is not None or _profiler_enabled()
                or self._gm_vars.get("_code") is not self._code):
            return DECLINED
        last, gen = prog._last, Generation.value
        if (last is None or not prog._plans or gen != last[2] or gen != self._hookless
                or x.requires_grad or x.dtype is not _F32 or x.layout is not _STRIDED
                or not x.is_cpu or x.shape != last[0]
                or x.stride() != last[1]
                or (_grad_enabled() and any(p.requires_grad for p in self._params))):
            return DECLINED
        for m in self._foreign:
            if m._forward_hooks or m._forward_pre_hooks:
                return DECLINED
        if ([f() for f in prog._foreign] != last[3] or last[4].lib is not native._lib
                or not self._lock.acquire(False)):
            return DECLINED
        try:
            plan = last[4]
            out = plan.out
            if out is None:
                out = plan.empty()
                if prog.keep_output:
                    plan.out = out
            slots = plan.slots
            slots[0] = x.data_ptr()
            slots[plan.out_slot] = out.data_ptr()
            fn, ops, count = plan.entry
            ws = getattr(_native_local, "ws_args", None) or native.workspace_args()
            if fn(ops, count, slots, ws[0], ws[1], _threads()):
                plan.program.run(slots)  # a workspace to grow (or a refusal to raise)
            return out
        finally:
            self._lock.release()

    def _eligible(self) -> bool:
        """Whether the per-layer path of every layer in a program would take its native kernel
        as far as global state goes (each program checks its input)."""
        if (self.gm.code is not self._code or torch.autograd._profiler_enabled()
                or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_forward_hooks_always_called):
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._params):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self._foreign):
            return False
        gen = state_generation()  # a hook on a Watched layer moves it; none found is remembered
        if gen != self._hookless:
            if any(m._forward_hooks or m._forward_pre_hooks for m in self._mods):
                return False
            self._hookless = gen
        return True


def _plain_io(gm: fx.GraphModule, value: fx.Node) -> bool:
    """Whether ``gm(x)`` hands ``x`` to its one placeholder and returns ``value`` as it is (no
    pytree structure around either)."""
    codegen, out = gm.graph._codegen, gm.graph.output_node().args[0]
    if type(codegen) is fx.graph.CodeGen:
        return out is value
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.out_spec is None or not info.out_spec.is_leaf():
        return False
    if not (isinstance(out, (tuple, list)) and len(out) == 1 and out[0] is value):
        return False
    return (info.in_spec is not None and info.in_spec.num_leaves == 1
            and pytree.tree_unflatten([0], info.in_spec) == ((0,), {}))


def runner_for(compiled: CompiledModel) -> NativePlanRunner | None:
    """A :class:`NativePlanRunner` for ``compiled``'s graph, or None where it has no run of native
    layers (or the native library is not built here)."""
    if not native.available():
        return None
    runner = NativePlanRunner(compiled.graph_module)
    return runner if runner._programs else None
