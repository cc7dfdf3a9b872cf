"""The cost models ``select_kernels`` decides with (not a pass): which eager CPU kernel a gated
layer should run, predicted from its shape or measured on this machine.

- predicted (default; deterministic, :func:`predicted_strategy`): ``nhwc`` (the channels-last
  kernel, :class:`ispc.ops.native.NhwcConv`) for a layer that reads channels-last maps; else
  ``native`` (the indirect GEMM of :mod:`ispc.ops.native`) where it could be built, but for the
  largest layers on large maps (``gather``: oneDNN on the gathered channels); without it, ``gemm`` (prepared ``W^T`` + one BLAS
  call) for 1x1 convolutions and small maps, where weights dominate the data moved, and ``gather``
  elsewhere.
- measured (``GatingConfig(latency_aware=True)``, :func:`measure`): every candidate kernel
  (:func:`candidates`) and the dense convolution timed on the layer's real input at
  ``latency_batch_size``, interleaved, medians; the fastest wins (the predicted one within
  :data:`PREDICTED_MARGIN`), and whether it beats dense by ``min_gain``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import fx, nn

from ispc.config import GatingConfig
from ispc.modules import ORIENTATIONS, GatedConv2d, GatedLinear, NhwcDenseConv2d, dense_conv
from ispc.native_plan import NativePlanRunner
from ispc.ops import linear_kernels, native
from ispc.ops.cpu_kernels import NATIVE_STRATEGIES, STRATEGIES, nhwc_serves, run_strategy
from ispc.ops.gated_conv import kept_all
from ispc.records import KEY, KernelChoice
from ispc.timing import time_interleaved

from .base import PassState, build_passes, node_shape, replace_submodule, run_passes

__all__ = ["predicted_strategy", "predicted_choice", "predicted_linear", "linear_positions",
           "candidates", "measure", "Measurement",
           "time_candidates", "timing_input", "layer_inputs", "input_hw", "out_hw", "SMALL_MAP",
           "LARGE_LAYER_MACS", "GATHER_MIN_MAP", "CL_MIN_CHANNELS", "PREDICTED_MARGIN",
           "ORIENT_NAMES", "PRUNE_RATIO", "PROGRAM_MARGIN", "LAYER_BUDGET_S", "geometry", "in_program",
           "built_runner", "time_runners", "known_hw", "UNKNOWN_HW", "keeps_every_channel",
           "left_dense", "winograd_alternative", "WINOGRAD_LABELS"]

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
#: measured selection keeps the predicted kernel unless another one measured faster by more than
#: this fraction: per-layer medians move by a few percent from one compile to the next on a shared
#: machine (without it, VGG-16's 28x28 layers took ORIENT_CO, 1.66x of dense inside the model,
#: over ORIENT_CL, 1.83x)
PREDICTED_MARGIN = 0.03
#: on channels-last maps the predicted ``nhwc`` kernel runs inside the runner's native program, and
#: ``gather`` outside it splits the program, so that the layers around it run one by one: it must
#: measure faster by more than this fraction (ResNet-50's four 128 -> 512 1x1 layers took
#: ``gather`` on one AVX2 compile by a noisy few percent: five programs, 27.7 ms, against 25.6-26.5
#: with them on ``nhwc`` in one program, docs/benchmarks.md). Kept beside the whole-model check
#: (``select_kernels.PROGRAM_WHOLE_MARGIN``), which takes or leaves all such layers at once
PROGRAM_MARGIN = 0.15
#: measured selection stops timing a kernel whose fastest call is slower than this many times the
#: leader's median after two timed rounds (``ispc.timing.time_interleaved(prune_ratio=...)``): far
#: outside PREDICTED_MARGIN and min_gain, and ResNet-50 at batch 32 spent most of its compile
#: timing kernels 2-3x slower than its dense convolutions
PRUNE_RATIO = 1.3
#: seconds of timed calls after which a layer's timing stops (past its fifth round): ResNet-50's
#: layers at batch 32 take 15-60 ms a call (15 rounds of seven kernels: 2-6 s a layer; with 1.0
#: here the compile at the default 15 rounds took 140 s); a layer at batch 1 never reaches it
LAYER_BUDGET_S = 0.5
#: the native kernel's orientation codes -> names (records and reports use the names)
ORIENT_NAMES = {code: name for name, code in ORIENTATIONS.items()}


def predicted_strategy(mod: GatedConv2d, out_hw: int, input_hw: tuple[int, int] | None = None, *,
                       channels_last: bool = False) -> tuple[str, int | None]:
    """The kernel (strategy, native orientation) the shape-based cost model expects to be fastest.

    Measured on ResNet/VGG layer shapes at batch 1 and 32 (``benchmarks/kernel_speed.py
    --native``): the native indirect GEMM wins on small and mid-sized layers: for kernels with
    several taps, lanes over output channels read from a channels-last copy of the kept channels
    (``ORIENT_CL``; lanes over positions for layers under ``CL_MIN_CHANNELS`` inputs on large
    maps); for 1x1 kernels, lanes over output channels on maps of at most ``native.SMALL_MAP``
    positions, over positions otherwise. oneDNN on the gathered channels wins on the largest
    layers on large maps (VGG's 224x224 to 56x56 layers, ~0.9-1.8 GMAC), where its gathers cost
    least relative to the convolution. A layer whose kernel covers its ``input_hw`` input (a
    gated linear layer) takes the native kernel's one-position orientation whatever its size.
    On ``channels_last`` maps the channels-last kernel (``nhwc``) reads the input in place and
    hands the layers after it channels-last maps: 0.8-1.0 of oneDNN's throughput per executed MAC
    on ResNet/VGG layers (``benchmarks/layers.py``), with no layout copies around it.
    """
    kh, kw = mod.weight.shape[-2:]
    if (input_hw is not None and _covers(mod, input_hw) and _native_fits(mod)
            and mod.weight.dtype == torch.float32):
        return "native", native.ORIENT_FULL
    if channels_last and native.available() and mod.weight.dtype == torch.float32:
        return "nhwc", None
    macs = mod.out_channels * mod.in_channels * kh * kw * out_hw
    if _native_fits(mod) and mod.weight.dtype == torch.float32 and (
            macs < LARGE_LAYER_MACS or out_hw <= GATHER_MIN_MAP):
        if kh * kw > 1 and (mod.in_channels >= CL_MIN_CHANNELS or out_hw <= native.SMALL_MAP):
            return "native", native.ORIENT_CL
        return "native", native.orientation_for(out_hw)
    if kh * kw == 1 or out_hw <= SMALL_MAP:
        return "gemm", None
    return "gather", None


#: a gated linear layer over at most this many positions per instance, with at most
#: ``LINEAR_NATIVE_MAX_CHANNELS`` input channels, takes the native kernel (lanes over output
#: channels, weights read in place); else ``gemm`` (ConvNeXt-T/ViT-S layer shapes, batch 1,
#: 2-core Xeon: native 1.4-1.6x of dense where it applies, gemm 1.1-1.4x)
LINEAR_NATIVE_MAX_POSITIONS = 256
LINEAR_NATIVE_MAX_CHANNELS = 1024


def linear_positions(node: fx.Node) -> int | None:
    """Positions (tokens) per instance a linear layer node reads (None: unknown)."""
    shape = node_shape(node.args[0]) if node.args else None
    if shape is None or len(shape) < 2:
        return None
    rows = 1
    for d in shape[1:-1]:
        rows *= int(d)
    return rows


def predicted_linear(mod: GatedLinear, positions: int | None) -> tuple[str, int | None]:
    """The kernel the shape-based cost model expects to be fastest for a gated linear layer: the
    channels-last native kernel where this build has it (1.2-1.9x of dense on ConvNeXt-T/ViT-S
    layer shapes at half the channels, batch 1, 2-core Xeon, the fastest on every shape timed),
    else the NCHW native kernel on small token counts, else gemm."""
    if linear_kernels.nhwc_available() and mod.weight.dtype == torch.float32:
        return "nhwc", None
    if (native.available() and mod.weight.dtype == torch.float32 and positions is not None
            and positions <= LINEAR_NATIVE_MAX_POSITIONS
            and mod.in_channels <= LINEAR_NATIVE_MAX_CHANNELS):
        return "native", native.ORIENT_CO
    return "gemm", None


def predicted_choice(mod: GatedConv2d, node: fx.Node, *,
                     channels_last: bool = False) -> KernelChoice:
    """:func:`predicted_strategy` for the layer at ``node`` (on ``channels_last`` maps), as a
    record."""
    if isinstance(mod, GatedLinear):
        strategy, orient = predicted_linear(mod, linear_positions(node))
    else:
        strategy, orient = predicted_strategy(mod, out_hw(node), input_hw(node),
                                              channels_last=channels_last)
    return KernelChoice(strategy=strategy, orient=ORIENT_NAMES[orient] if strategy == "native" else None,
                        cost_model="predicted")


def _native_fits(mod: GatedConv2d) -> bool:
    return native.available() and native.supports(mod.stride)


def _covers(mod: GatedConv2d, input_hw: tuple[int, int]) -> bool:
    return native.full_window(tuple(mod.weight.shape[-2:]), mod.padding, mod.dilation, input_hw)


def candidates(mod: GatedConv2d, input_hw: tuple[int, int] | None = None, *,
               channels_last: bool = False) -> dict[str, tuple[str, int | None]]:
    """Every kernel measured selection times for ``mod`` on ``input_hw`` inputs: label ->
    (strategy, orientation). On ``channels_last`` inputs (where the native library is built) the
    two kernels whose output is channels-last too, ``nhwc`` and ``gather``."""
    if isinstance(mod, GatedLinear):
        lin: dict[str, tuple[str, int | None]] = {"gemm": ("gemm", None)}
        if native.available():
            lin["native:co"] = ("native", native.ORIENT_CO)
            lin["native:pix"] = ("native", native.ORIENT_PIX)
        if linear_kernels.nhwc_available():
            lin["nhwc"] = ("nhwc", None)
        return lin
    if channels_last and native.available() and mod.weight.dtype == torch.float32:
        # only kernels that hand the next layers channels-last maps: one that returns NCHW maps
        # (native, gemm) can win its own timing yet cost more in the layers after it (ResNet-50's
        # 7x7 layers took native:co, and every layer after them then ran on NCHW maps with a
        # residual add across layouts: the whole model 26.2 ms, ORT 27.0)
        return {"nhwc": ("nhwc", None), "gather": ("gather", None)}
    out: dict[str, tuple[str, int | None]] = {s: (s, None) for s in STRATEGIES
                                              if s not in NATIVE_STRATEGIES}
    if _native_fits(mod):
        out["native:pix"] = ("native", native.ORIENT_PIX)
        out["native:co"] = ("native", native.ORIENT_CO)
        if mod.weight.shape[-2:].numel() > 1:  # a 1x1 layer's channels-last copy is ORIENT_CO's panel
            out["native:cl"] = ("native", native.ORIENT_CL)
        if input_hw is not None and _covers(mod, input_hw):
            out["native:full"] = ("native", native.ORIENT_FULL)
    return out


#: the label of the ``nhwc`` kernel by the algorithm the rule did not choose (measure times both)
WINOGRAD_LABELS = {True: "nhwc:winograd", False: "nhwc:direct"}


def winograd_alternative(kernel: native.NhwcConv) -> bool:
    """Whether a gated layer's ``nhwc`` kernel runs by Winograd or directly as timed: a 3x3
    stride-1 layer with at least ``native.WINO_MIN_CHANNELS`` input channels (with fewer the
    transforms always lost: VGG's 3 -> 64 stem 1.54 -> 3.65 ms)."""
    return (native.winograd_fits(kernel.kernel, kernel.stride, kernel.dilation)
            and kernel.cin >= native.WINO_MIN_CHANNELS)


def input_hw(node: fx.Node) -> tuple[int, int] | None:
    """The spatial size of the map a layer node reads (None: unknown, or not a map)."""
    shape = node_shape(node.args[0]) if node.args else None
    return shape[-2:] if shape is not None and len(shape) == 4 else None


#: what :func:`out_hw` says of a node whose shape is unknown (larger than any map)
UNKNOWN_HW = 1 << 30


def out_hw(node: fx.Node) -> int:
    """Output positions of a layer node (unknown: :data:`UNKNOWN_HW`)."""
    tm = node.meta.get("tensor_meta")
    return int(tm.shape[-1] * tm.shape[-2]) if tm is not None else UNKNOWN_HW


def timing_input(state: PassState) -> torch.Tensor | None:
    """The calibration inputs repeated up to ``latency_batch_size`` (what every latency-aware
    timing runs on), or None where no calibration input was kept."""
    if not state.calibration_cache:
        return None
    bs = state.config.latency_batch_size
    pool = torch.cat(state.calibration_cache)
    reps = -(-bs // pool.shape[0])
    return pool.repeat(reps, *([1] * (pool.dim() - 1)))[:bs]


def known_hw(hw: int) -> int | None:
    """``hw`` from :func:`out_hw`, or None where the shape is unknown (the modules' ``out_hw``)."""
    return hw if hw < UNKNOWN_HW else None


def layer_inputs(gm: fx.GraphModule, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named submodule sees when ``gm`` runs ``x``."""
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


def in_program(kernel: native.NhwcConv | native.DepthwiseConv3x3, xin: torch.Tensor,
               mode: int = native.DENSE, scale: torch.Tensor | None = None, threshold: float = 0.0,
               k: int = 0, saliency: int = 0) -> Callable[[], None]:
    """A call of a channels-last ``kernel`` on ``xin`` as the eager backend's runner makes it
    (:class:`ispc.native_plan.NativePlanRunner`): one op of an :class:`~ispc.ops.native.OpProgram`
    writing into an output buffer allocated once (``call.out``). The layer's own call allocates a
    fresh output each time, and at large batches that output page-faults on every call, which the
    runner never pays: timed that way, gated layers looked slower than they run in the model
    (docs/benchmarks.md)."""
    n, c, h, w = xin.shape
    prog = native.OpProgram()
    if isinstance(kernel, native.DepthwiseConv3x3):
        prog.add_depthwise(kernel, 0, 1, (n, c, h, w))
        out_shape = (n, c, *kernel.out_size(h, w))
    else:
        if mode != native.DENSE and kept_all(mode, threshold, k, c):
            mode = native.DENSE
        if mode != native.DENSE:
            scale = scale.detach().to(torch.float32).contiguous()
        prog.add_conv(kernel, 0, 1, (n, c, h, w), mode, scale, threshold, k, saliency)
        out_shape = kernel.out_shape(n, h, w)
    out = torch.empty(out_shape, dtype=torch.float32, memory_format=torch.channels_last)
    slots = native.OpProgram.slot_array(2)
    slots[0], slots[1] = xin.data_ptr(), out.data_ptr()

    def call() -> None:
        prog.run(slots)

    call.x, call.out = xin, out  # what the slots point into, held as long as the call
    return call


def built_runner(gm: fx.GraphModule, state: PassState, swaps: dict[str, nn.Module] | None = None,
                 *, dense_kernels: bool = True) -> NativePlanRunner:
    """The eager backend's runner of a copy of ``gm`` (``swaps``: name -> module put in place) as
    the compile goes on to build it: the ``builds`` passes still pending in ``state``'s pipeline
    applied (:func:`~ispc.passes.base.build_passes`; ``dense_kernels`` predicted, and left out
    where not ``dense_kernels``): the plain convolutions on ispc's native kernels, epilogues
    fused, sums handed over, each run of native layers one program. What whole-model checks
    time: the graph before these passes runs unfused epilogues and oneDNN layers that split the
    native programs (ResNet-50 at batch 32 measured ~1135 ms gated that way where the compiled
    model runs ~600 ms, and MobileNetV2 at batch 32 lost every gate to it). ``gm`` is left as it
    was."""
    g = copy.deepcopy(gm)
    for node in g.graph.nodes:  # the copy's nodes share their records with gm's: its own
        if KEY in node.meta:
            node.meta[KEY] = copy.deepcopy(node.meta[KEY])
    for name, m in (swaps or {}).items():
        replace_submodule(g, name, copy.deepcopy(m))
    # predicted, not measured: dense_kernels' own timing would time every plain layer again
    st = dataclasses.replace(state, notes=[], progress=False,
                             config=dataclasses.replace(state.config, latency_aware=False))
    g = run_passes(g, st, [n for n in build_passes(state) if dense_kernels or n != "dense_kernels"])
    return NativePlanRunner(g)


def time_runners(runners: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int,
                 **kwargs: Any) -> dict[str, float]:
    """:func:`time_candidates` of whole models (e.g. :func:`built_runner`'s) each called on ``x``
    without autograd."""
    with torch.no_grad():
        return time_candidates({k: (lambda r=r: r(x)) for k, r in runners.items()}, rounds, **kwargs)


def time_candidates(fns: dict[str, Callable[[], Any]], rounds: int, *, cuda: bool = False,
                    prune_ratio: float | None = None, keep: tuple[str, ...] = (),
                    budget_s: float | None = None) -> dict[str, float]:
    """Median ms of each function, interleaved (:func:`ispc.timing.time_interleaved`, two
    warm-up calls each; ``prune_ratio``/``keep``: stop timing clear losers; ``budget_s``: fewer
    rounds when calls are long); ``cuda`` waits for the device after each call (its kernels run
    asynchronously: the host clock alone would time only the launches)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: (fn(), sync())

    timings = time_interleaved({k: synced(fn) for k, fn in fns.items()}, warmup=2, rounds=rounds,
                               progress=False, prune_ratio=prune_ratio, keep=keep,
                               budget_s=budget_s)
    return {k: t.median for k, t in timings.items()}


@dataclass
class Measurement:
    """One layer measured: its fastest kernel ``best`` (strategy, orientation), and whether that
    beats dense by ``min_gain`` (``gated``; else the layer is left dense, as ``plain``)."""

    best: tuple[str, int | None]
    gated: bool
    times: dict[str, float]
    plain: nn.Module  #: the layer left dense
    channels_last: bool  #: the input layout it was timed on
    cuda: bool
    #: ``best`` is ``nhwc`` on a layer that fits Winograd: by Winograd (True) or direct (False),
    #: both timed; None: not timed (the rule decides)
    winograd: bool | None = None

    def choice(self, cfg: GatingConfig) -> KernelChoice:
        """The kernel record of this measurement."""
        return KernelChoice(
            strategy=self.best[0], orient=ORIENT_NAMES.get(self.best[1]) if self.best[0] == "native" else None,
            cost_model="measured", times_ms={k: round(v, 4) for k, v in self.times.items()},
            batch_size=cfg.latency_batch_size,
            input_layout="channels_last" if self.channels_last else None,
            runs_on="cuda" if self.cuda else None, winograd=self.winograd)

    def reason(self, cfg: GatingConfig) -> str:
        """Why the layer is left dense, when it is."""
        best = min(v for k, v in self.times.items() if k != "dense")
        return (f"no measured gain at batch {cfg.latency_batch_size}"
                f"{' on NCHW input' if not self.channels_last and not self.cuda else ''}: "
                f"gated {best:.3f} ms vs dense {self.times['dense']:.3f} ms")


def geometry(mod: GatedConv2d, xin: torch.Tensor) -> tuple:
    """What a layer's kernel timings depend on: its type, weights' shape, stride, padding, dilation,
    gate (mode, threshold, k), epilogue, and its input's shape, layout, dtype and device. Layers
    of one geometry (a ResNet stage's repeated blocks) time alike: measured once per compile."""
    return (type(mod), tuple(mod.weight.shape), mod._args, mod.residual_add, mod.act,
            mod.in_index is not None, tuple(xin.shape), native.is_channels_last(xin), xin.dtype,
            xin.device)


def keeps_every_channel(mod: GatedConv2d) -> bool:
    """A top-k gate that keeps all its input channels (``keep_ratio=1.0``) skips no MACs: its
    selection is pure cost, so the layer is left dense without timing it."""
    return mod.mode == "topk" and mod.k >= mod.in_channels


def left_dense(mod: GatedConv2d, xin: torch.Tensor, node: fx.Node) -> nn.Module:
    """The layer as it runs when left dense, on its input ``xin``."""
    plain = dense_conv(mod, tuple(xin.shape[-2:]))
    if (type(plain) is nn.Conv2d and nhwc_serves(xin) and native.available()
            and NhwcDenseConv2d.fits(plain)):
        # on channels-last maps the runner runs the native layers as one program: left dense,
        # the layer runs there too (NhwcDenseConv2d), not as a oneDNN call that would split the
        # program and have its neighbours run one by one
        plain = NhwcDenseConv2d(plain, known_hw(out_hw(node)))
    return plain


def measure(mod: GatedConv2d, xin: torch.Tensor, node: fx.Node, cfg: GatingConfig,
            cache: dict[tuple, Measurement] | None = None) -> Measurement:
    """Time ``mod``'s kernels and its dense convolution on its input ``xin`` (``mod`` is left on
    the last kernel timed: apply the measurement's :meth:`~Measurement.choice`). ``cache``: the
    measurements of this compile by :func:`geometry`; a layer of a geometry already measured
    takes that measurement (with its own dense layer) without timing."""
    key = geometry(mod, xin) if cache is not None else None
    o_hw, i_hw = out_hw(node), input_hw(node)
    plain = left_dense(mod, xin, node)
    in_runner = isinstance(plain, NhwcDenseConv2d)
    if key is not None and key in cache:
        return replace(cache[key], plain=plain)
    a = mod._args
    fns = {"dense": in_program(plain.prepared, xin) if in_runner else lambda: plain(xin)}
    algos: dict[str, bool] = {}  # nhwc labels of a layer that fits Winograd -> by Winograd
    if xin.is_cuda:
        # on a GPU the layer runs the operator's CUDA kernel (Triton) whatever the CPU
        # strategy: time that against the dense convolution; the CPU choice stays predicted
        if isinstance(mod, GatedLinear):
            kernels = {"cuda": predicted_linear(mod, linear_positions(node))}
            fns["cuda"] = lambda: mod(xin)
        else:
            kernels = {"cuda": predicted_strategy(mod, o_hw, i_hw)}
            fns["cuda"] = lambda: torch.ops.ispc.gated_conv2d(xin, mod.weight, mod.bias, mod.scale,
                                                              *a)
    elif isinstance(mod, GatedLinear):
        kernels = candidates(mod)
        for label, (strat, orient) in kernels.items():
            mod.set_strategy(strat, orient)
            fns[label] = (lambda s=strat, wt=mod.prepared: linear_kernels.run(
                s, xin, mod.weight, wt, mod.bias, mod.scale, a[6], a[7], a[8], a[9]))
    else:
        kernels = candidates(mod, tuple(xin.shape[-2:]), channels_last=nhwc_serves(xin))
        for label, (strat, orient) in list(kernels.items()):
            mod.set_strategy(strat, orient, out_hw=known_hw(o_hw))
            if strat == "nhwc" and isinstance(mod.prepared, native.NhwcConv) and nhwc_serves(xin):
                # as the runner calls it: inside a program, into a buffer it keeps
                fns[label] = in_program(mod.prepared, xin, a[6], mod.scale, a[7], a[8], a[9])
                if label == "nhwc" and winograd_alternative(mod.prepared):
                    rule = mod.prepared.winograd
                    # the rule's algorithm (label "nhwc") and the other one, timed alike: the
                    # rule's limits were measured on two CPUs, and the crossing moves with the
                    # FMA width and caches (docs/benchmarks.md)
                    alt = WINOGRAD_LABELS[not rule]
                    algos.update({label: rule, alt: not rule})
                    mod.set_strategy(strat, orient, out_hw=known_hw(o_hw), winograd=not rule)
                    kernels[alt] = (strat, orient)
                    fns[alt] = in_program(mod.prepared, xin, a[6], mod.scale, a[7], a[8], a[9])
                continue
            fns[label] = (lambda s=strat, wt=mod.prepared: run_strategy(
                s, xin, mod.weight, wt, mod.bias, mod.scale, mod.stride, mod.padding, mod.dilation,
                a[6], a[7], a[8], a[9]))
    label = None  # the predicted kernel's: timed every round (never pruned on two calls a
    # slow spell of the machine disturbed), and kept unless another one is clearly faster
    if not xin.is_cuda:
        pred = (predicted_linear(mod, linear_positions(node)) if isinstance(mod, GatedLinear)
                else predicted_strategy(mod, o_hw, i_hw, channels_last=nhwc_serves(xin)))
        label = next((lb for lb, kern in kernels.items() if kern == pred), None)
    with torch.no_grad():
        times = time_candidates(fns, cfg.latency_rounds, cuda=xin.is_cuda, prune_ratio=PRUNE_RATIO,
                                keep=("dense",) if label is None else ("dense", label),
                                budget_s=LAYER_BUDGET_S)
    best = min(kernels, key=lambda s: times[s])
    margin = PREDICTED_MARGIN
    if label is not None and kernels[label][0] == "nhwc" and kernels[best][0] != "nhwc":
        margin = PROGRAM_MARGIN  # leaving the program costs the layers around it too
    if label is not None and times[label] <= times[best] * (1.0 + margin):
        best = label
    m = Measurement(kernels[best], times[best] <= times["dense"] * (1.0 - cfg.min_gain), times,
                    plain, native.is_channels_last(xin), xin.is_cuda, algos.get(best))
    if key is not None:
        cache[key] = m
    return m


def layout_sums(gm: fx.GraphModule, x: torch.Tensor, nodes: dict[str, fx.Node],
                nchw: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
                cfg: GatingConfig) -> tuple[float, float]:
    """Milliseconds the convolutions that read channels-last maps take in sum, channels-last and
    NCHW: each gated layer's kernel chosen for either layout (``nchw``: name -> the layer for
    NCHW inputs), and each plain convolution (a stem, which oneDNN runs up to 2x faster on a
    3-channel NHWC input), the two timed interleaved (the choices' own timings come from rounds
    seconds apart, and a shared machine's speed moves more than the difference between them)."""
    plain = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target not in nodes
             and type(gm.get_submodule(n.target)) is nn.Conv2d]
    pairs = {name: (gm.get_submodule(name), alt, inputs[name]) for name, alt in nchw.items()}
    for name, xin in layer_inputs(gm, plain, x).items():
        if native.is_channels_last(xin):
            pairs[name] = (gm.get_submodule(name), gm.get_submodule(name), xin)
    t_nhwc = t_nchw = 0.0
    for name, (mod, alt, xin) in pairs.items():
        xn = xin.contiguous()
        with torch.no_grad():
            t = time_candidates({"nhwc": lambda: mod(xin), "nchw": lambda: alt(xn)},
                                cfg.latency_rounds)
        t_nhwc, t_nchw = t_nhwc + t["nhwc"], t_nchw + t["nchw"]
    return t_nhwc, t_nchw
