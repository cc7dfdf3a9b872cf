"""Wall-clock benchmarks: gated model against its BatchNorm-folded dense self, same backend.

Timing rules (DESIGN.md; the helpers are :mod:`ispc.timing`'s, re-exported here): warm-up first,
then many *interleaved* rounds (every candidate once per round, in a rotating order) so drift and
background load hit all candidates alike; report medians and the spread, and the ratio against
the baseline measured in the same run. Realized speed-up is shown next to the theoretical one
(dense MACs / MACs actually executed).
"""
from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from .compiled import CompiledModel
from .errors import DataError
from .modules import GatedConv2d
from .passes.channels_last import runs_channels_last
from .pipeline import dense_graph
from .runtimes import (RUNTIMES, RuntimeTiming, export_dense_onnx, resolve_runtimes,
                       runtime_available, time_runtimes)
from .timing import Timing, default_progress, retain_freed_memory, time_interleaved

__all__ = ["Timing", "BenchmarkResult", "time_interleaved", "dense_baseline", "input_batches",
           "benchmark", "retain_freed_memory", "MAX_INPUT_BATCHES"]


def dense_baseline(model: nn.Module, example: torch.Tensor, *,
                   channels_last: bool = False) -> nn.Module:
    """The model as ispc sees it before gating (:func:`ispc.pipeline.dense_graph`: traced, eval
    mode, BatchNorm folded, pools lowered and, with ``channels_last``, its maps channels-last): the
    same lowerings the compiled model gets, so speed-ups measure gating alone (dense MobileNetV2
    runs 1.44x faster channels-last at batch 1 on a 2-core Xeon, dense ResNet-18 0.89x)."""
    return dense_graph(model, example, channels_last=channels_last)


@dataclass
class BenchmarkResult:
    """One model at one batch size: dense vs gated medians and the speed-ups."""

    model: str
    batch_size: int
    dense_ms: float
    gated_ms: float
    dense_iqr_ms: tuple[float, float]
    gated_iqr_ms: tuple[float, float]
    realized_speedup: float
    theoretical_speedup: float
    efficiency: float  #: realized / theoretical
    mac_reduction: float
    threads: int
    allocator: str = ""
    inputs: str = ""  #: what was timed: the distinct batches cycled through, and their source
    #: the feature maps' memory layout, the compiled model's and so the dense baseline's
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: most distinct batches one batch size cycles through (``benchmark(inputs=...)``)
MAX_INPUT_BATCHES = 64


def input_batches(batch_size: int, *, inputs: torch.Tensor | None = None,
                  input_shape: tuple[int, ...] | None = None, pool: int = 4,
                  seed: int = 0) -> list[torch.Tensor]:
    """The distinct batches a benchmark at ``batch_size`` cycles through.

    From ``inputs`` (examples, ``(M, *shape)``): consecutive examples, wrapping around, as many
    batches as it takes to use each example once (at most :data:`MAX_INPUT_BATCHES`). Without
    them: ``pool`` batches of random normal inputs of ``input_shape``.
    """
    if batch_size < 1:
        raise DataError(f"batch sizes must be at least 1, got {batch_size}")
    if inputs is None:
        if input_shape is None:
            raise DataError("give the input shape (without the batch dimension) or example inputs")
        if pool < 1:
            raise DataError(f"input_pool must be at least 1, got {pool}")
        g = torch.Generator().manual_seed(seed)
        return [torch.randn((batch_size, *input_shape), generator=g) for _ in range(pool)]
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise DataError("inputs must be a tensor of examples, (M, *input_shape) with M >= 1, got "
                        + (f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor)
                           else type(inputs).__name__))
    if input_shape is not None and tuple(inputs.shape[1:]) != tuple(input_shape):
        raise DataError(f"inputs have examples of shape {tuple(inputs.shape[1:])}, not the "
                        f"input_shape {tuple(input_shape)} given; pass one or the other")
    m = inputs.shape[0]
    count = min(MAX_INPUT_BATCHES, -(-m // batch_size))
    return [inputs[torch.arange(i * batch_size, (i + 1) * batch_size) % m] for i in range(count)]


def benchmark(model: nn.Module, compiled: CompiledModel, input_shape: tuple[int, ...] | None = None,
              *, batch_sizes: tuple[int, ...] = (1,), warmup: int = 5, rounds: int = 30,
              name: str | None = None, seed: int = 0, progress: bool | None = None,
              retain_memory: bool = True, inputs: torch.Tensor | None = None,
              input_pool: int = 4) -> list[BenchmarkResult]:
    """Measure ``compiled`` against the BN-folded dense ``model`` at each batch size.

    ``input_shape`` is one input without the batch dimension (e.g. ``(3, 224, 224)``). Every call
    takes the next of several distinct batches (:func:`input_batches`), the same sequence for both
    models: which channels a gated model keeps, and so which weights it reads, depends on the
    input, and one input repeated would let the part of the weights it reads stay in cache from
    call to call, where real traffic changes it. ``inputs`` are examples to cut the batches from
    (real data: its sparsity is what the gates see in use); without them, ``input_pool`` batches of
    random normal inputs. The theoretical speed-up uses the MACs the gates execute on those batches.
    ``retain_memory`` calls :func:`retain_freed_memory` first (process-wide; both models alike).
    """
    allocator = retain_freed_memory() if retain_memory else "as configured by the process"
    if progress is None:
        progress = default_progress()
    param = next(compiled.parameters())
    results = []
    for bs in batch_sizes:
        pool = [x.to(param.device, param.dtype)
                for x in input_batches(bs, inputs=inputs, input_shape=input_shape, pool=input_pool,
                                       seed=seed)]
        nhwc = runs_channels_last(compiled.graph_module)
        dense = dense_baseline(model, pool[0][:1], channels_last=nhwc)
        sync = torch.cuda.synchronize if pool[0].is_cuda else (lambda: None)

        def run(m: nn.Module) -> Callable[[], None]:
            batches = itertools.cycle(pool)  # each candidate its own cursor: the same sequence

            def call() -> None:
                with torch.no_grad():
                    m(next(batches))
                sync()
            return call

        timings = time_interleaved({"dense": run(dense), "gated": run(compiled)}, warmup=warmup,
                                   rounds=rounds, progress=progress,
                                   desc=f"ispc: timing batch {bs}")
        measured = compiled.measure(pool, progress=False)
        theo = measured["dense_macs"] / max(measured["executed_macs"], 1.0)
        d, q = timings["dense"], timings["gated"]
        realized = d.median / q.median
        source = (f"{inputs.shape[0]} given examples" if inputs is not None
                  else f"random normal (seed {seed})")
        results.append(BenchmarkResult(
            model=name or type(model).__name__, batch_size=bs, dense_ms=d.median, gated_ms=q.median,
            dense_iqr_ms=(d.p25, d.p75), gated_iqr_ms=(q.p25, q.p75), realized_speedup=realized,
            theoretical_speedup=theo, efficiency=realized / theo,
            mac_reduction=measured["mac_reduction"], threads=torch.get_num_threads(),
            allocator=allocator, inputs=f"{len(pool)} distinct batches, cycled: {source}",
            layout="NHWC" if nhwc else "NCHW"))
    return results


def results_table(results: list[BenchmarkResult], tablefmt: str = "simple") -> str:
    """A table for people."""
    rows = [[r.model + (" (NHWC)" if r.layout == "NHWC" else ""), r.batch_size, f"{r.dense_ms:.2f}",
             f"{r.gated_ms:.2f}",
             f"{r.mac_reduction:.1%}", f"{r.theoretical_speedup:.2f}x", f"{r.realized_speedup:.2f}x",
             f"{r.efficiency:.2f}"] for r in results]
    return tabulate(rows, headers=["model", "batch", "dense ms", "gated ms", "MAC cut",
                                   "theoretical", "realized", "realized/theor."],
                    tablefmt=tablefmt, disable_numparse=True)


def results_json(results: list[BenchmarkResult]) -> str:
    """JSON for programs."""
    return json.dumps([r.to_dict() for r in results], indent=2)


__all__ += ["results_table", "results_json"]


def benchmark_runtimes(model: nn.Module, compiled: CompiledModel,
                       input_shape: tuple[int, ...] | None = None, *,
                       batch_sizes: tuple[int, ...] = (1,), runtimes: Any = "all",
                       baseline: str = "best", rounds: int = 3, calls: int = 30, warmup: int = 5,
                       threads: int | None = None, name: str | None = None,
                       inputs: torch.Tensor | None = None, input_pool: int = 4, seed: int = 0,
                       in_process: bool = False, progress: bool | None = None
                       ) -> list[RuntimeTiming]:
    """Time ``compiled`` against the dense ``model`` in every installed runtime, at each batch size.

    ``runtimes``: names of :data:`ispc.runtimes.RUNTIMES` (PyTorch eager NCHW/NHWC, inductor with
    freezing, ONNX Runtime, OpenVINO f32 and default), "all" (default) or "none"; the
    ``baseline`` runtime is added when it names one. Each runs in fresh processes of its own,
    ``rounds`` of them rotated, ``warmup`` untimed then ``calls`` timed calls each, cycling through
    the batches :func:`input_batches` cuts (``inputs`` or ``input_pool`` random ones); the compiled
    model is saved and timed after :func:`ispc.load` in a fresh process too
    (:func:`ispc.runtimes.time_runtimes`). A runtime that is not installed comes back with
    ``available=False`` and a note. The model is exported to ONNX once for all batch sizes.
    Speed-ups: :func:`ispc.runtimes.compare` / :func:`~ispc.runtimes.speedup_lines` /
    :func:`~ispc.runtimes.runtimes_table` with the same ``baseline``.
    """
    names = resolve_runtimes(runtimes, baseline)
    if progress is None:
        progress = default_progress()
    out: list[RuntimeTiming] = []
    with tempfile.TemporaryDirectory(prefix="ispc-bench-") as tmp:
        onnx_path = None
        for bs in batch_sizes:
            batches = input_batches(bs, inputs=inputs, input_shape=input_shape, pool=input_pool,
                                    seed=seed)
            if onnx_path is None and any(RUNTIMES[r].artifact == "onnx"
                                         and runtime_available(r)[0] for r in names):
                try:  # once for every batch size (dynamic batch); on failure each call says why
                    onnx_path = export_dense_onnx(model, batches[0], f"{tmp}/model.onnx")
                except Exception:
                    onnx_path = None
            out += time_runtimes(model, compiled, batches, runtimes=names, threads=threads,
                                 rounds=rounds, calls=calls, warmup=warmup, in_process=in_process,
                                 name=name or type(model).__name__, onnx_path=onnx_path,
                                 progress=progress)
    return out


__all__ += ["benchmark_runtimes"]


def _timed_forwards(model: nn.Module, x: torch.Tensor, rounds: int,
                    warmup: int) -> tuple[dict[str, float], float]:
    """Median ms of each convolution / gated layer of ``model`` on ``x``, and of the whole forward.

    Layers are timed with forward pre/post hooks inside whole-model runs, so cache state is
    realistic; the whole forward is timed in the same runs, so the two medians are comparable.
    """
    starts: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    whole: list[float] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, GatedConv2d)) or type(mod).__name__ == "StaticConv2d":
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: starts.__setitem__(name, time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: times.setdefault(name, []).append(
                    (time.perf_counter() - starts[name]) * 1e3)))
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(x)
            times.clear()
            for _ in range(rounds):
                t0 = time.perf_counter()
                model(x)
                whole.append((time.perf_counter() - t0) * 1e3)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v) for k, v in times.items()}, statistics.median(whole)


def layer_times(model: nn.Module, x: torch.Tensor, *, rounds: int = 10,
                warmup: int = 2) -> dict[str, float]:
    """Median wall-clock milliseconds of each convolution / gated layer of ``model`` on ``x``.

    Measured with forward pre/post hooks inside whole-model runs, so cache state is realistic.
    """
    return _timed_forwards(model, x, rounds, warmup)[0]


def layer_breakdown(dense: nn.Module, compiled: CompiledModel, x: torch.Tensor, *,
                    rounds: int = 10) -> dict[str, Any]:
    """Per-layer medians (ms), dense vs gated, with each gated layer's kernel, at ``x``'s batch.

    Also the convolutions' sum and the whole forward pass, timed in the same runs: what the gated
    model spends outside its convolutions (pooling, activations, adds) is where a realized
    speed-up below the layers' own is lost. JSON-ready.
    """
    td, wd = _timed_forwards(dense, x, rounds, 2)
    tg, wg = _timed_forwards(compiled.graph_module, x, rounds, 2)
    layers = []
    for name, t in td.items():
        mod = compiled.graph_module.get_submodule(name) if name in tg else None
        layers.append({"layer": name,
                       "kernel": mod.strategy if isinstance(mod, GatedConv2d) else "dense",
                       "dense_ms": t, "gated_ms": tg.get(name)})
    return {"batch_size": int(x.shape[0]), "layers": layers,
            "conv_dense_ms": sum(td.values()), "conv_gated_ms": sum(tg.values()),
            "whole_dense_ms": wd, "whole_gated_ms": wg}


def layer_table(dense: nn.Module, compiled: CompiledModel, x: torch.Tensor, *, rounds: int = 10,
                tablefmt: str = "simple", breakdown: dict[str, Any] | None = None) -> str:
    """:func:`layer_breakdown` as a table for people (pass ``breakdown`` to format one already
    measured)."""
    r = breakdown or layer_breakdown(dense, compiled, x, rounds=rounds)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    def ratio(a: float, b: float | None) -> str:
        return "-" if b is None or b <= 0 else f"{a / b:.2f}x"

    rows = [[e["layer"], e["kernel"], ms(e["dense_ms"]), ms(e["gated_ms"]),
             ratio(e["dense_ms"], e["gated_ms"])] for e in r["layers"]]
    cd, cg, wd, wg = r["conv_dense_ms"], r["conv_gated_ms"], r["whole_dense_ms"], r["whole_gated_ms"]
    rows.append(["total (conv layers)", "", ms(cd), ms(cg), ratio(cd, cg)])
    rows.append(["outside conv layers", "", ms(wd - cd), ms(wg - cg), ratio(wd - cd, wg - cg)])
    rows.append(["whole model (hooked)", "", ms(wd), ms(wg), ratio(wd, wg)])
    return tabulate(rows, headers=["layer", "kernel", "dense ms", "gated ms", "speed-up"],
                    tablefmt=tablefmt, disable_numparse=True)


__all__ += ["layer_times", "layer_breakdown", "layer_table"]
