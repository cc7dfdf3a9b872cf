"""The compiler's pipelines, in one place: what every entry point runs on a user's model.

Each entry point (``ispc.compile``, ``ispc.inspect``, the benchmarks' dense baseline, the static
pruning baseline, ``ispc.load``, feature decay's default sites) runs one of the named pass lists
below, on a private eval-mode copy of the user's model, with a :class:`~ispc.passes.PassState` built
from the calibration data, and reads the result back from the graph (:func:`build_report`).

Layering (imports only go down; ``tests/test_layering.py`` checks it with ``ast``)::

    ispc.cli, ispc (the package), ispc.examples               <- top: what users run
    (ispc._runtime_worker: a timing worker process, importing lazily only its own runtime)
    ispc.api, ispc.benchmark, ispc.baselines, ispc.serialization, ispc.gate_masks, ispc.runtimes,
    ispc.tune
    ispc.backends (the registry, tensorrt, onnx), ispc.feature_decay
    ispc.pipeline                                             <- this module
    ispc.passes (one pass per file; base, then the passes)
    ispc.compiled, ispc.export
    ispc.modules
    ispc.ops (the operator and its kernels)
    ispc.config, ispc.data, ispc.records, ispc.timing, ispc.report, ispc.observers,
    ispc.distributed, ispc.datasets, ispc.plots
    ispc.errors                                               <- bottom

A module may import from its own layer or below, never above; there is no import cycle (module- or
function-level), and no module imports another module's ``_private`` name. A function-level
import is only for an optional third-party package (matplotlib, onnx, torch_tensorrt, triton).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from .compiled import CompiledModel
from .config import GatingConfig
from .data import iter_inputs
from .dense_route import routed
from .errors import ConfigError, DataError, UnsupportedModelError
from .records import GateDecision
from .passes import PassState, records, run_passes
from .passes.channels_last import insert_converters, runs_channels_last
from .report import LayerReport, Report
from .timing import default_progress

__all__ = ["ANALYSIS", "COMPILE", "DENSE", "SITES", "RELOAD", "PIPELINES", "check_config",
           "unwrap", "private_copy", "new_state", "run", "build_report", "dense_graph",
           "site_names", "reload"]

#: the analysis passes (``ispc.inspect``, the static-pruning baseline)
ANALYSIS: tuple[str, ...] = ("capture", "lift", "fold_bn", "linear_as_conv", "find_sites", "calibrate",
                             "rank")
#: ``ispc.compile``. ``refine`` runs before ``select_kernels`` so that kernels are chosen (and
#: timed) at the kept counts the model will run with, and again after it because un-gating a
#: layer changes what the layers after it see; ``channels_last`` just before ``select_kernels``, so
#: that kernels are timed in the layout the model will run in; ``dense_kernels`` after the last
#: ``refine`` (the layers left dense are its candidates); ``fuse_epilogues`` next (it changes
#: no value, and the passes before it hook gated layers' outputs); ``hand_sums`` next (sums of
#: the values the fused epilogues store, between the kernels chosen); ``dense_route`` last (it
#: compares the model as built with the dense runtimes installed)
COMPILE: tuple[str, ...] = ANALYSIS + ("insert_gates", "lower_pools", "refine", "prune_dead",
                                       "channels_last", "select_kernels", "refine",
                                       "dense_kernels", "fuse_epilogues", "hand_sums", "dense_route")
#: the dense baseline a gated model is timed against: the same lowerings, no gates
DENSE: tuple[str, ...] = ("capture", "lift", "fold_bn", "lower_pools")
#: where gates could go, from the model's structure alone (feature decay's default layers)
SITES: tuple[str, ...] = ("capture", "lift", "find_sites")
#: what ``ispc.load`` runs on the graph it rebuilt from an archive (which holds average pools and
#: the epilogues as plain ATen calls, and no links between layers)
RELOAD: tuple[str, ...] = ("lower_pools", "fuse_epilogues", "hand_sums")

#: every named pipeline
PIPELINES: dict[str, tuple[str, ...]] = {"inspect": ANALYSIS, "compile": COMPILE, "dense": DENSE,
                                         "sites": SITES, "reload": RELOAD}


def check_config(config: Any) -> GatingConfig:
    """``config``, or the default one; anything but a :class:`GatingConfig` is refused."""
    if config is None:
        return GatingConfig()
    if not isinstance(config, GatingConfig):
        raise ConfigError(f"config must be an ispc.GatingConfig, got {type(config).__name__}; "
                          "e.g. ispc.GatingConfig(keep_ratio=0.5)")
    return config


def unwrap(model: Any) -> nn.Module:
    """The module to compile: ``model`` itself, what a DataParallel, DistributedDataParallel or
    ``torch.compile`` wrapper holds, or an ``ExportedProgram``'s ``.module()`` (captured already).
    Refuses other non-modules and models ispc already compiled."""
    if isinstance(model, ExportedProgram):
        return model.module()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"ispc compiles a torch.nn.Module, got {type(model).__name__}; "
                                    "pass the model object (e.g. a torchvision/timm model instance)")
    if isinstance(model, CompiledModel):
        raise UnsupportedModelError("this model is already compiled by ispc; compile the original")
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
                "DataParallel", "DistributedDataParallel", "OptimizedModule"):
            return inner
    return model


def private_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy, so nothing ispc does can touch the user's model."""
    bad = {n: p.dtype for n, p in model.named_parameters() if not p.is_floating_point()}
    if bad:
        name, dtype = next(iter(bad.items()))
        raise UnsupportedModelError(f"parameter {name!r} has dtype {dtype}; ispc compiles floating-point "
                                    "models (float32, float16, bfloat16): quantize after ispc")
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        raise UnsupportedModelError(f"the model cannot be deep-copied ({type(exc).__name__}: {exc}); "
                                    "ispc never modifies the user's model in place, so it needs a copy: "
                                    "make the model deep-copyable (e.g. remove open handles)") from None
    return work.eval()


def _device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


def new_state(work: nn.Module, calibration_data: Any, config: GatingConfig,
              progress: bool | None) -> PassState:
    """The pass state of one run: the config, and the calibration data as a checked stream of
    inputs on the model's device and dtype (its first batch is the example input)."""
    state = PassState(config=config, progress=default_progress() if progress is None else bool(progress))
    if calibration_data is None:
        return state
    device, dtype = _device_dtype(work)
    stream = iter_inputs(calibration_data, device=device, dtype=dtype)
    first = next(stream, None)
    if first is None:
        raise DataError("calibration_data yielded no batches; pass a non-empty iterable of inputs "
                        "(or call ispc.compile(model) without data for topk gating)")
    state.example_inputs = (first,)
    state.calibration = stream
    state.input_name = stream.key
    return state


def run(model: nn.Module, calibration_data: Any = None, *, config: GatingConfig | None = None,
        pipeline: str | Sequence[str] = "compile",
        progress: bool | None = None) -> tuple[fx.GraphModule, PassState]:
    """Run a named pipeline (a key of :data:`PIPELINES`, or a list of pass names) on a private
    copy of ``model``; returns the graph module and the state the passes left."""
    names = PIPELINES[pipeline] if isinstance(pipeline, str) else tuple(pipeline)
    cfg = check_config(config)
    source = unwrap(model)
    work = private_copy(source)
    state = new_state(work, calibration_data, cfg, progress)
    state.source = source
    return run_passes(work, state, names), state


def build_report(gm: fx.GraphModule, state: PassState) -> Report:
    """What the passes found and decided, read from the graph's records, as a :class:`Report`
    (of the graph a dense route replaced, where it did)."""
    route = routed(gm)
    graph = route.__dict__.get("as_built") if route is not None else None
    rows: list[LayerReport] = []
    for node in (graph if isinstance(graph, fx.Graph) else gm.graph).nodes:
        rec = records(node)
        layer, gate = rec.layer, rec.gate or GateDecision(gated=False)
        if layer is None:
            continue
        row = LayerReport(
            name=layer.name, op=layer.op, in_channels=layer.in_channels,
            out_channels=layer.out_channels, kernel=layer.kernel, stride=layer.stride,
            groups=layer.groups, macs=layer.macs, cv=gate.cv, rank=gate.rank, gated=gate.gated,
            reason=gate.reason or layer.reason, threshold=gate.threshold, k=gate.k,
            kept_mean=gate.kept_mean, kept_p10=gate.kept_p10, kept_p90=gate.kept_p90,
            site=layer.site, cpu_kernel=rec.kernel.label if rec.kernel else None,
            out_pruned=rec.pruning.out_channels, in_pruned=rec.pruning.in_channels)
        if row.macs is not None:
            if row.gated and row.kept_fraction is not None:
                kept = row.kept_fraction
            else:  # an ungated layer reads every channel prune_dead left it
                kept = 1.0 - row.in_pruned / row.in_channels if row.in_channels else 1.0
            row.expected_macs = row.macs * kept * (1.0 - row.out_pruned / max(row.out_channels, 1))
        rows.append(row)
    known = all(r.macs is not None for r in rows)
    dense = sum(r.macs for r in rows) if known and rows else None
    expected = sum(r.expected_macs for r in rows) if known and rows else None
    cfg = state.config
    summary = {
        "mode": cfg.mode, "keep_ratio": cfg.keep_ratio, "saliency": cfg.saliency,
        "calibrated": state.calibrated, "calibration_samples": state.calibration_samples,
        "layers_total": len(rows), "layers_gated": sum(r.gated for r in rows),
        "dense_macs": dense, "expected_macs": expected,
        "mac_reduction": (1.0 - expected / dense) if dense else None,
        "input_shape": list(state.example_inputs[0].shape[1:]) if state.example_inputs else None,
        "channels_last": runs_channels_last(gm) if route is None else False,
        "capture": state.capture,
        "dense_route": dict(route.decision) if route is not None else None,
    }
    notes = list(state.notes)
    if not rows:  # never 0 layers in silence
        notes.append(f"no convolution or linear layer in the captured graph (capture: {state.capture})"
                     ": nothing to gate; layers hidden in a leaf module or a function the capture "
                     "cannot see are not counted (try GatingConfig(capture='export'))")
    elif dense is None:
        notes.append("MACs unknown: no example input to measure shapes (pass calibration data)")
    else:
        notes.append("MACs count conv2d and linear layers per input at the calibration input size")
    return Report(layers=rows, summary=summary, config=cfg.to_dict(), notes=notes,
                  channel_graph=state.channel_graph)


def dense_graph(model: nn.Module, example: torch.Tensor, *, channels_last: bool = False) -> fx.GraphModule:
    """The model as ispc sees it before gating (:data:`DENSE`: traced, eval mode, BatchNorm folded,
    pools lowered) and, with ``channels_last``, its maps channels-last: the same lowerings the
    compiled model gets, so that speed-ups measure gating alone."""
    gm, _ = run(model, [example], config=GatingConfig(keep_ratio=1.0), pipeline="dense",
                progress=False)
    if channels_last:
        insert_converters(gm)
    return gm


def site_names(model: nn.Module, config: GatingConfig | None = None) -> list[str]:
    """The names of the layers ``ispc.compile`` would consider gating (:data:`SITES`: structural
    rules only, no data). Tracing reads the model and changes nothing, so this runs on ``model``
    itself (it may be in training, on any device); raises :class:`~ispc.errors.TraceError` where
    torch.fx cannot trace it."""
    state = PassState(config=check_config(config), progress=False)
    gm = run_passes(model, state, SITES)
    return [records(n).layer.name for n in gm.graph.nodes
            if records(n).layer is not None and records(n).layer.candidate]


def reload(gm: fx.GraphModule, config: GatingConfig) -> fx.GraphModule:
    """:data:`RELOAD` on a graph rebuilt from an archive (lowers its average pools, fuses its
    epilogues and links its saliency sums again)."""
    return run_passes(gm, PassState(config=config, progress=False), RELOAD)
