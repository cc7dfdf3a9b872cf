"""Select each gated layer's CPU kernel, and keep a layer dense where gating does not pay.

Two cost models:

- predicted (default; deterministic): ``native`` (the indirect GEMM of :mod:`ispc.ops.native`)
  where it could be built, but for the largest layers (``gather``); otherwise ``gemm`` (prepared ``W^T`` + one BLAS call) for 1x1
  convolutions and small feature maps, where weights dominate the data moved, and ``gather``
  (oneDNN on the gathered channels) elsewhere.
- measured (``GatingConfig(latency_aware=True)``): every candidate kernel and the dense convolution
  are timed on this machine, on the layer's real input from the calibration data at
  ``latency_batch_size``, interleaved, medians; the fastest kernel wins, and a layer whose best gated
  time does not beat dense by ``min_gain`` is left dense with the measured times as its reason.
  This makes the compiled model never slower than dense layer by layer, at the price of results
  that depend on the machine and its load.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ispc.modules import GatedConv2d, dense_conv
from ispc.ops import native
from ispc.ops.cpu_kernels import STRATEGIES, run_strategy
from ispc.timing import time_interleaved

from .base import PassState, ispc_meta, node_shape, register_pass, replace_submodule
from .channels_last import layout_converters, runs_channels_last

__all__ = ["select_kernels", "predicted_strategy", "candidates", "SMALL_MAP", "ORIENT_NAMES",
           "CL_MIN_CHANNELS", "PREDICTED_MARGIN", "LAYOUT_MARGIN"]

#: without the native kernel, maps with at most this many output positions use the gemm kernel
SMALL_MAP = 14 * 14

#: dense MACs per instance from which oneDNN on the gathered channels beats the native kernel, on
#: maps of more than ``GATHER_MIN_MAP`` positions (VGG-16's 224x224 to 56x56 layers; on its 28x28
#: and 14x14 ones, as large, the channels-last orientation is faster)
LARGE_LAYER_MACS = 400_000_000
GATHER_MIN_MAP = 32 * 32
#: a layer whose kernel has several taps takes the native kernel's channels-last orientation
#: (``native.ORIENT_CL``) unless it has fewer input channels than this on a map larger than
#: ``native.SMALL_MAP`` (CIFAR's 16-channel 32x32 layers: a reduction too short for channel lanes)
CL_MIN_CHANNELS = 32
#: latency-aware selection keeps the predicted kernel unless another one measured faster by more
#: than this fraction: per-layer medians move by a few percent from one compile to the next on a
#: shared machine, and without the margin VGG-16's 28x28 layers took ORIENT_CO in one compile
#: (1.66x of dense inside the model) over ORIENT_CL (1.83x)
PREDICTED_MARGIN = 0.03
#: the kernels that keep a channels-last input's layout (oneDNN on the gathered channels)
OWN_LAYOUT = ("gather", "grouped")
#: with the layout left to measurement (``GatingConfig.channels_last=None``), channels-last is kept
#: only where the layers reading channels-last maps measured faster in sum than on NCHW maps and
#: the whole model then measured faster than NCHW by more than this fraction. VGG-16 gains 4% from
#: it at batch 1; ResNets lose (a residual add that mixes layouts is slow), and without the
#: per-layer test one whole-model check kept it for ResNet-50 on noise (8% faster there, 0.85 of
#: the MAC ratio in the benchmark after it, 0.89-0.93 on NCHW)
LAYOUT_MARGIN = 0.01

#: said when a model is gated on a GPU without latency-aware selection
CUDA_NOTE = ("ispc: gated layers on CUDA run a Triton kernel that measured slower than cuDNN's "
             "dense convolution on every ResNet-50 and VGG-16 layer shape timed so far (H200, half "
             "the channels kept: 1.6-8.6x the time of float32 cuDNN; examples/gpu_check.py); the "
             "gates' accuracy is the same as on the CPU, but for speed pass "
             "GatingConfig(latency_aware=True), which keeps only layers that pay on this GPU")

ORIENT_NAMES = {native.ORIENT_PIX: "pix", native.ORIENT_CO: "co", native.ORIENT_FULL: "full",
                native.ORIENT_CL: "cl"}


def predicted_strategy(mod: GatedConv2d, out_hw: int,
                       input_hw: tuple[int, int] | None = None) -> tuple[str, int | None]:
    """The kernel (strategy, native orientation) the shape-based cost model expects to be fastest.

    Measured on ResNet/VGG layer shapes at batch 1 and 32 (``examples/kernel_speed.py --native``):
    the native indirect GEMM wins on small and mid-sized layers: for kernels with several taps,
    lanes over output channels read from a channels-last copy of the kept channels
    (``ORIENT_CL``; lanes over positions for layers under ``CL_MIN_CHANNELS`` inputs on large
    maps); for 1x1 kernels, lanes over output channels on maps of at most ``native.SMALL_MAP``
    positions, over positions otherwise. oneDNN on the gathered channels wins on the largest
    layers on large maps (VGG's 224x224 to 56x56 layers, ~0.9-1.8 GMAC), where its gathers cost
    least relative to the convolution. A layer whose kernel covers its ``input_hw`` input (a
    gated linear layer) takes the native kernel's one-position orientation whatever its size:
    2-3x faster than the dense matrix-vector product at half the channels (batch 1).
    """
    kh, kw = mod.weight.shape[-2:]
    if (input_hw is not None and _full(mod, input_hw) and _native_fits(mod)
            and mod.weight.dtype == torch.float32):
        return "native", native.ORIENT_FULL
    macs = mod.out_channels * mod.in_channels * kh * kw * out_hw
    if _native_fits(mod) and mod.weight.dtype == torch.float32 and (
            macs < LARGE_LAYER_MACS or out_hw <= GATHER_MIN_MAP):
        if kh * kw > 1 and (mod.in_channels >= CL_MIN_CHANNELS or out_hw <= native.SMALL_MAP):
            return "native", native.ORIENT_CL
        return "native", native.orientation_for(out_hw)
    if kh * kw == 1 or out_hw <= SMALL_MAP:
        return "gemm", None
    return "gather", None


def _native_fits(mod: GatedConv2d) -> bool:
    return native.available() and native.supports(mod.stride)


def _full(mod: GatedConv2d, input_hw: tuple[int, int]) -> bool:
    return native.full_window(tuple(mod.weight.shape[-2:]), mod.padding, mod.dilation, input_hw)


def candidates(mod: GatedConv2d,
               input_hw: tuple[int, int] | None = None) -> dict[str, tuple[str, int | None]]:
    """Every kernel latency-aware selection times for ``mod`` on ``input_hw`` inputs:
    label -> (strategy, orientation)."""
    out: dict[str, tuple[str, int | None]] = {s: (s, None) for s in STRATEGIES if s != "native"}
    if _native_fits(mod):
        out["native:pix"] = ("native", native.ORIENT_PIX)
        out["native:co"] = ("native", native.ORIENT_CO)
        if mod.weight.shape[-2:].numel() > 1:  # a 1x1 layer's channels-last copy is ORIENT_CO's panel
            out["native:cl"] = ("native", native.ORIENT_CL)
        if input_hw is not None and _full(mod, input_hw):
            out["native:full"] = ("native", native.ORIENT_FULL)
    return out


def _input_hw(node: fx.Node) -> tuple[int, int] | None:
    shape = node_shape(node.args[0]) if node.args else None
    return shape[-2:] if shape is not None and len(shape) == 4 else None


def _inputs_of(gm: fx.GraphModule, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _time(fns: dict[str, callable], rounds: int, *, cuda: bool = False) -> dict[str, float]:
    """Median ms of each function, interleaved (:func:`ispc.timing.time_interleaved`, two
    warm-up calls each); ``cuda`` waits for the device after each call (its kernels run
    asynchronously: the host clock alone would time only the launches)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def synced(fn: callable) -> callable:
        return lambda: (fn(), sync())

    timings = time_interleaved({k: synced(fn) for k, fn in fns.items()}, warmup=2, rounds=rounds,
                               progress=False)
    return {k: t.median for k, t in timings.items()}


@dataclass
class _Choice:
    """One layer's measured decision: its fastest kernel ``best`` (strategy, orientation), and
    whether that beats dense by ``min_gain`` (``gated``; else the layer is left dense)."""

    best: tuple[str, int | None]
    gated: bool
    times: dict[str, float]
    plain: nn.Module  # the layer left dense
    channels_last: bool  # the input layout it was timed on
    cuda: bool

    def meta(self, cfg) -> dict[str, Any]:
        kernel = {"strategy": self.best[0], "cost_model": "measured",
                  "times_ms": {k: round(v, 4) for k, v in self.times.items()},
                  "batch_size": cfg.latency_batch_size}
        if self.channels_last:
            kernel["input_layout"] = "channels_last"
        if self.cuda:
            kernel["runs_on"] = "cuda"  # the operator's CUDA kernel; "strategy" is for CPU
        elif self.best[1] is not None:
            kernel["orient"] = ORIENT_NAMES[self.best[1]]
        return kernel

    def reason(self, cfg) -> str:
        best = min(v for k, v in self.times.items() if k != "dense")
        return (f"no measured gain at batch {cfg.latency_batch_size}"
                f"{' on NCHW input' if not self.channels_last and not self.cuda else ''}: "
                f"gated {best:.3f} ms vs dense {self.times['dense']:.3f} ms")


def _measure(mod: GatedConv2d, xin: torch.Tensor, out_hw: int, in_hw: tuple[int, int] | None,
             cfg) -> _Choice:
    """Time ``mod``'s kernels and its dense convolution on its input ``xin``: the fastest kernel
    (the predicted one within ``PREDICTED_MARGIN``), gated if it saves ``min_gain`` of the dense
    time. Leaves ``mod`` on that kernel."""
    a = mod._args
    plain = dense_conv(mod, tuple(xin.shape[-2:]))  # what the layer would be, left dense
    fns = {"dense": lambda: plain(xin)}
    if xin.is_cuda:
        # on a GPU the layer runs the operator's CUDA kernel (Triton) whatever the CPU
        # strategy: time that against the dense convolution; the CPU choice stays predicted
        kernels = {"cuda": predicted_strategy(mod, out_hw, in_hw)}
        fns["cuda"] = lambda: torch.ops.ispc.gated_conv2d(xin, mod.weight, mod.bias, mod.scale, *a)
    else:
        kernels = candidates(mod, tuple(xin.shape[-2:]))
        for label, (strat, orient) in kernels.items():
            mod.set_strategy(strat, orient)
            fns[label] = (lambda s=strat, wt=mod.prepared: run_strategy(
                s, xin, mod.weight, wt, mod.bias, mod.scale, mod.stride, mod.padding, mod.dilation,
                a[6], a[7], a[8], a[9]))
    with torch.no_grad():
        times = _time(fns, cfg.latency_rounds, cuda=xin.is_cuda)
    best = min(kernels, key=lambda s: times[s])
    if not xin.is_cuda:
        pred = predicted_strategy(mod, out_hw, in_hw)
        label = next((lb for lb, kern in kernels.items() if kern == pred), None)
        if label is not None and times[label] <= times[best] * (1.0 + PREDICTED_MARGIN):
            best = label
    mod.set_strategy(*kernels[best])
    return _Choice(kernels[best], times[best] <= times["dense"] * (1.0 - cfg.min_gain), times,
                   plain, native.is_channels_last(xin), xin.is_cuda)


def _apply(gm: fx.GraphModule, name: str, meta: dict, choice: _Choice, cfg) -> bool:
    """Record ``choice`` in the layer's meta and put the dense layer in place where it is not
    gated. Returns whether the graph changed."""
    meta["kernel"] = choice.meta(cfg)
    if choice.gated:
        return False
    replace_submodule(gm, name, choice.plain)
    _ungate_meta(meta, choice.reason(cfg))
    return True


def _ungate_meta(meta: dict, reason: str) -> None:
    meta["gate"].update(gated=False, threshold=None, k=None, kept_mean=None, kept_p10=None,
                        kept_p90=None, reason=reason)


def _out_hw(node: fx.Node) -> int:
    tm = node.meta.get("tensor_meta")
    return int(tm.shape[-1] * tm.shape[-2]) if tm is not None else 1 << 30


@register_pass("select_kernels")
def select_kernels(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Set ``GatedConv2d.strategy`` per layer; with ``latency_aware``, un-gate layers that don't pay."""
    cfg = state.config
    nodes = {n.target: n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GatedConv2d)}
    measured = cfg.latency_aware and state.calibration_cache and nodes
    if not cfg.latency_aware and any(gm.get_submodule(n).weight.is_cuda for n in nodes):
        state.notes.append(CUDA_NOTE)
        warnings.warn(CUDA_NOTE, stacklevel=2)
    if not measured:
        for name, node in nodes.items():
            mod: GatedConv2d = gm.get_submodule(name)
            mod.set_strategy(*predicted_strategy(mod, _out_hw(node), _input_hw(node)))
            meta = ispc_meta(node)
            meta["kernel"] = {"strategy": mod.strategy, "cost_model": "predicted"}
            if mod.strategy == "native":
                meta["kernel"]["orient"] = ORIENT_NAMES[mod.orient]
        if cfg.channels_last is None:
            for c in layout_converters(gm):  # a layout left to measurement that was not measured
                c.enabled = False
        return gm
    pool = torch.cat(state.calibration_cache)
    reps = -(-cfg.latency_batch_size // pool.shape[0])
    x = pool.repeat(reps, *([1] * (pool.dim() - 1)))[:cfg.latency_batch_size]
    inputs = _inputs_of(gm, list(nodes), x)
    changed = False
    # each gated layer and its gate's meta before any choice (a layer left dense in one layout may
    # stay gated in the other)
    originals = {n: gm.get_submodule(n) for n in nodes}
    gates = {n: copy.deepcopy(ispc_meta(node).get("gate")) for n, node in nodes.items()}

    def choose(name: str, xin: torch.Tensor) -> None:
        nonlocal changed
        node = nodes[name]
        choice = _measure(gm.get_submodule(name), xin, _out_hw(node), _input_hw(node), cfg)
        changed |= _apply(gm, name, ispc_meta(node), choice, cfg)

    for name in nodes:
        if name in inputs:
            choose(name, inputs[name])
    nchw: dict[str, tuple[nn.Module, _Choice]] = {}
    if runs_channels_last(gm):
        # a layer on the native kernel hands the layers after it NCHW maps: time again, on the
        # input they now see, the layers whose input layout the first round's choices changed
        now = _inputs_of(gm, [n for n in nodes if isinstance(gm.get_submodule(n), GatedConv2d)], x)
        for name, xin in now.items():
            if native.is_channels_last(xin) != native.is_channels_last(inputs[name]):
                choose(name, xin)
                inputs[name] = xin
        if cfg.channels_last is None:
            # the other layout's kernels, for the whole-model check to time both: every layer
            # that reads a channels-last map, timed on the same map in NCHW
            for name, xin in inputs.items():
                if native.is_channels_last(xin):
                    alt = copy.deepcopy(originals[name])
                    choice = _measure(alt, xin.contiguous(), _out_hw(nodes[name]),
                                      _input_hw(nodes[name]), cfg)
                    nchw[name] = (alt if choice.gated else choice.plain, choice)
        if nchw:
            t_nhwc, t_nchw = _layout_sums(gm, x, nodes, nchw, inputs, cfg)
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
        _whole_model_check(gm, state, x, nodes, nchw, gates)
    elif cfg.channels_last is None:
        for c in layout_converters(gm):  # dense: the user's layout
            c.enabled = False
    return gm


def _whole_model_check(gm: fx.GraphModule, state: PassState, x: torch.Tensor,
                       nodes: dict[str, fx.Node], nchw: dict[str, tuple[nn.Module, _Choice]],
                       gates: dict[str, dict | None]) -> None:
    """Per-layer wins need not add up (caches, dispatch): time the whole gated graph against the
    same graph with every gate removed; if gating is not faster, remove every gate.

    With the layout left to measurement (``GatingConfig.channels_last=None``) both are timed in
    both layouts (the gated graph on NCHW maps with the kernels measured for NCHW inputs,
    ``nchw``), and the faster layout of each is compared: the compiled model is then never slower
    than the dense model in either layout (dense MobileNetV2 runs 1.44x faster channels-last at
    batch 1 on a 2-core Xeon, faster than gated on NCHW maps: it comes back dense,
    channels-last)."""
    cfg = state.config
    metas = {n: ispc_meta(node) for n, node in nodes.items()}
    current = {n: gm.get_submodule(n) for n in nodes}
    converters = layout_converters(gm)
    nhwc = runs_channels_last(gm)
    free = bool(converters) and cfg.channels_last is None  # the layout is measured here
    hws = {n: _input_hw(node) for n, node in nodes.items()}

    def swap(mods: dict[str, nn.Module], channels_last: bool) -> None:
        for name, m in mods.items():
            replace_submodule(gm, name, m)
        for c in converters:
            c.enabled = channels_last

    def run() -> None:
        with torch.no_grad():
            gm(x)

    dense = {n: dense_conv(m, hws.get(n)) if isinstance(m, GatedConv2d) else m
             for n, m in current.items()}
    configs = {"gated": (current, nhwc)}
    if free and nhwc:
        configs["gated_nchw"] = ({**current, **{n: m for n, (m, _) in nchw.items()}}, False)
    configs["dense"] = (dense, nhwc and not free)
    if free:
        configs["dense_nhwc"] = (dense, True)
    # one call at a time, the configurations alternating (each call swaps its modules in, the same
    # cost for both), so that a slow spell of a shared machine hits both alike. Timed in blocks of
    # a few calls per configuration, the check once removed every gate of a MobileNetV2 that runs
    # ~1.25x faster gated (examples/speed.py at batch 1; compiled again alone, it kept them all).
    # A layout is a smaller difference than gating's: more rounds for it.
    rounds = max(5, cfg.latency_rounds if free else cfg.latency_rounds // 2)
    times = _time({label: (lambda c=c: (swap(*c), run())) for label, c in configs.items()},
                  rounds, cuda=x.is_cuda)

    def faster(a: str, b: str) -> str:
        """b (channels-last) if it is measured and faster than a (NCHW, the user's layout) by
        LAYOUT_MARGIN, else a."""
        return b if b in configs and times[b] < times[a] * (1.0 - LAYOUT_MARGIN) else a

    best = faster("gated_nchw", "gated") if "gated_nchw" in configs else "gated"
    best_dense = faster("dense", "dense_nhwc")
    t_gated, t_dense = times[best], times[best_dense]
    layout = ""
    if free:
        layout = " (" + ", ".join(
            f"{'gated' if k.startswith('gated') else 'dense'} "
            f"{'channels-last' if configs[k][1] else 'NCHW'} {times[k]:.2f} ms"
            for k in configs) + ")"
    if t_gated < t_dense:
        swap(*configs[best])
        if best == "gated_nchw":
            for name, (_, choice) in nchw.items():
                _record_nchw(metas[name], choice, cfg, gates[name])
        if any(not isinstance(m, GatedConv2d) for m in configs[best][0].values()):
            gm.recompile()
        kept = f"; gated, {'channels-last' if configs[best][1] else 'NCHW'}" if free else ""
        state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated "
                           f"{t_gated:.2f} ms vs dense {t_dense:.2f} ms{layout}{kept}")
        return
    swap(*configs[best_dense])
    for name, m in current.items():
        if isinstance(m, GatedConv2d):
            _ungate_meta(metas[name], f"whole model not faster gated at batch "
                                      f"{cfg.latency_batch_size} ({t_gated:.2f} ms vs dense "
                                      f"{t_dense:.2f} ms)")
    kept = f"; dense, {'channels-last' if configs[best_dense][1] else 'NCHW'}" if free else ""
    state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated {t_gated:.2f} ms "
                       f"was not faster than dense {t_dense:.2f} ms, so every gate was removed"
                       f"{layout}{kept}")
    gm.recompile()


def _layout_sums(gm: fx.GraphModule, x: torch.Tensor, nodes: dict[str, fx.Node],
                 nchw: dict[str, tuple[nn.Module, _Choice]], inputs: dict[str, torch.Tensor],
                 cfg) -> tuple[float, float]:
    """Milliseconds the convolutions that read channels-last maps take in sum, channels-last and
    NCHW: each gated layer's kernel chosen for either layout, and each plain convolution (a stem,
    which oneDNN runs up to 2x faster on a 3-channel NHWC input), the two timed interleaved (the
    choices' own timings come from rounds seconds apart, and a shared machine's speed moves
    more than the difference between them)."""
    plain = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target not in nodes
             and type(gm.get_submodule(n.target)) is nn.Conv2d]
    pairs = {name: (gm.get_submodule(name), alt, inputs[name]) for name, (alt, _) in nchw.items()}
    for name, xin in _inputs_of(gm, plain, x).items():
        if native.is_channels_last(xin):
            pairs[name] = (gm.get_submodule(name), gm.get_submodule(name), xin)
    t_nhwc = t_nchw = 0.0
    for name, (mod, alt, xin) in pairs.items():
        xn = xin.contiguous()
        with torch.no_grad():
            t = _time({"nhwc": lambda: mod(xin), "nchw": lambda: alt(xn)}, cfg.latency_rounds)
        t_nhwc, t_nchw = t_nhwc + t["nhwc"], t_nchw + t["nchw"]
    return t_nhwc, t_nchw


def _use_nchw(gm: fx.GraphModule, nchw: dict[str, tuple[nn.Module, _Choice]],
              gates: dict[str, dict | None], cfg) -> None:
    """Run NCHW: converters off, the kernels measured on NCHW inputs in place, their meta."""
    for c in layout_converters(gm):
        c.enabled = False
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, (mod, choice) in nchw.items():
        replace_submodule(gm, name, mod)
        _record_nchw(ispc_meta(nodes[name]), choice, cfg, gates[name])


def _record_nchw(meta: dict, choice: _Choice, cfg, gate: dict | None) -> None:
    """The meta of a layer that runs the kernel measured for NCHW inputs (or dense): its gate's
    meta as it was before the channels-last choices, which may have left it dense."""
    if gate is not None:
        meta["gate"] = copy.deepcopy(gate)
    meta["kernel"] = choice.meta(cfg)
    if not choice.gated:
        _ungate_meta(meta, choice.reason(cfg))
