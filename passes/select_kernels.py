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

import warnings

import torch
from torch import fx, nn

from ispc.modules import GatedConv2d, dense_conv
from ispc.ops import native
from ispc.ops.cpu_kernels import STRATEGIES, run_strategy

from .base import PassState, ispc_meta, node_shape, register_pass, replace_submodule

__all__ = ["select_kernels", "predicted_strategy", "candidates", "SMALL_MAP", "ORIENT_NAMES",
           "CL_MIN_CHANNELS", "PREDICTED_MARGIN"]

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
    """Median ms of each function, interleaved (:func:`ispc.benchmark.time_interleaved`, two
    warm-up calls each); ``cuda`` waits for the device after each call (its kernels run
    asynchronously: the host clock alone would time only the launches)."""
    from ispc.benchmark import time_interleaved

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def synced(fn: callable) -> callable:
        return lambda: (fn(), sync())

    timings = time_interleaved({k: synced(fn) for k, fn in fns.items()}, warmup=2, rounds=rounds,
                               progress=False)
    return {k: t.median for k, t in timings.items()}


def _ungate_meta(meta: dict, reason: str) -> None:
    meta["gate"].update(gated=False, threshold=None, k=None, kept_mean=None, kept_p10=None,
                        kept_p90=None, reason=reason)


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
    inputs: dict[str, torch.Tensor] = {}
    if measured:
        pool = torch.cat(state.calibration_cache)
        reps = -(-cfg.latency_batch_size // pool.shape[0])
        x = pool.repeat(reps, *([1] * (pool.dim() - 1)))[:cfg.latency_batch_size]
        inputs = _inputs_of(gm, list(nodes), x)
    changed = False
    for name, node in nodes.items():
        mod: GatedConv2d = gm.get_submodule(name)
        tm = node.meta.get("tensor_meta")
        out_hw = int(tm.shape[-1] * tm.shape[-2]) if tm is not None else 1 << 30
        meta = ispc_meta(node)
        in_hw = _input_hw(node)
        if not measured or name not in inputs:
            mod.set_strategy(*predicted_strategy(mod, out_hw, in_hw))
            meta["kernel"] = {"strategy": mod.strategy, "cost_model": "predicted"}
            if mod.strategy == "native":
                meta["kernel"]["orient"] = ORIENT_NAMES[mod.orient]
            continue
        xin = inputs[name]
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
        meta["kernel"] = {"strategy": kernels[best][0], "cost_model": "measured",
                          "times_ms": {k: round(v, 4) for k, v in times.items()},
                          "batch_size": cfg.latency_batch_size}
        if xin.is_cuda:
            meta["kernel"]["runs_on"] = "cuda"  # the operator's CUDA kernel; "strategy" is for CPU
        elif kernels[best][1] is not None:
            meta["kernel"]["orient"] = ORIENT_NAMES[kernels[best][1]]
        if times[best] > times["dense"] * (1.0 - cfg.min_gain):
            replace_submodule(gm, name, plain)
            _ungate_meta(meta, f"no measured gain at batch {cfg.latency_batch_size}: "
                               f"gated {times[best]:.3f} ms vs dense {times['dense']:.3f} ms")
            changed = True
        else:
            mod.set_strategy(*kernels[best])
    if changed:
        gm.recompile()
    if measured and any(isinstance(m, GatedConv2d) for m in gm.modules()):
        _whole_model_check(gm, state, x, {n: ispc_meta(node) for n, node in nodes.items()},
                           {n: _input_hw(node) for n, node in nodes.items()})
    return gm


def _whole_model_check(gm: fx.GraphModule, state: PassState, x: torch.Tensor,
                       metas: dict[str, dict], hws: dict[str, tuple[int, int] | None]) -> None:
    """Per-layer wins need not add up (caches, dispatch): time the whole gated graph against the
    same graph with every gate removed; if gating is not faster, remove every gate."""
    cfg = state.config
    gated = {n: gm.get_submodule(n) for n, m in metas.items()
             if isinstance(gm.get_submodule(n), GatedConv2d)}
    dense = {name: dense_conv(mod, hws.get(name)) for name, mod in gated.items()}

    def swap(mods: dict[str, nn.Module]) -> None:
        for name, m in mods.items():
            replace_submodule(gm, name, m)

    def run() -> None:
        with torch.no_grad():
            gm(x)

    # one call at a time, the configurations alternating (each call swaps its modules in, the same
    # cost for both), so that a slow spell of a shared machine hits both alike. Timed in blocks of
    # a few calls per configuration, the check once removed every gate of a MobileNetV2 that runs
    # ~1.25x faster gated (examples/speed.py at batch 1; compiled again alone, it kept them all).
    times = _time({label: (lambda mods=mods: (swap(mods), run()))
                   for label, mods in (("gated", gated), ("dense", dense))},
                  max(5, cfg.latency_rounds // 2), cuda=x.is_cuda)
    t_gated, t_dense = times["gated"], times["dense"]
    if t_gated < t_dense:
        swap(gated)
        state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated "
                           f"{t_gated:.2f} ms vs dense {t_dense:.2f} ms")
        return
    swap(dense)
    for name in gated:
        _ungate_meta(metas[name], f"whole model not faster gated at batch {cfg.latency_batch_size} "
                                  f"({t_gated:.2f} ms vs dense {t_dense:.2f} ms)")
    state.notes.append(f"whole-model check at batch {cfg.latency_batch_size}: gated {t_gated:.2f} ms "
                       f"was not faster than dense {t_dense:.2f} ms, so every gate was removed")
    gm.recompile()
