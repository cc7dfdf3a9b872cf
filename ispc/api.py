"""The public entry points: :func:`compile` and :func:`inspect`."""
from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import fx, nn

from .compiled import CompiledModel
from .config import GatingConfig
from .data import iter_inputs
from .errors import BackendUnavailableError, ConfigError, DataError, UnsupportedModelError
from .passes import ANALYSIS_PIPELINE, COMPILE_PIPELINE, PassState, ispc_meta, run_passes
from .passes.channels_last import runs_channels_last
from .report import LayerReport, Report

__all__ = ["compile", "inspect", "build_report", "BACKENDS"]

#: backends ``ispc.compile`` accepts
BACKENDS = ("eager", "inductor", "tensorrt")


def _check_config(config: Any) -> GatingConfig:
    if config is None:
        return GatingConfig()
    if not isinstance(config, GatingConfig):
        raise ConfigError(f"config must be an ispc.GatingConfig, got {type(config).__name__}; "
                          "e.g. ispc.GatingConfig(keep_ratio=0.5)")
    return config


def _unwrap(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"ispc compiles a torch.nn.Module, got {type(model).__name__}; "
                                    "pass the model object (e.g. a torchvision/timm model instance)")
    if isinstance(model, CompiledModel):
        raise UnsupportedModelError("this model is already compiled by ispc; compile the original")
    # DataParallel / DistributedDataParallel / torch.compile wrappers: compile what they wrap
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
                "DataParallel", "DistributedDataParallel", "OptimizedModule"):
            return inner
    return model


def _private_copy(model: nn.Module) -> nn.Module:
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


def _default_progress() -> bool:
    """Progress bars when a person is watching (stderr is a terminal)."""
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


def _make_state(work: nn.Module, calibration_data: Any, cfg: GatingConfig,
                progress: bool | None) -> PassState:
    state = PassState(config=cfg, progress=_default_progress() if progress is None else bool(progress))
    if calibration_data is None:
        return state
    device, dtype = _model_device_dtype(work)
    stream = iter_inputs(calibration_data, device=device, dtype=dtype)
    first = next(stream, None)
    if first is None:
        raise DataError("calibration_data yielded no batches; pass a non-empty iterable of inputs "
                        "(or call ispc.compile(model) without data for topk gating)")
    state.example_inputs = (first,)
    state.calibration = stream
    return state


def _kernel_label(meta: dict) -> str | None:
    kernel = meta.get("kernel")
    if not kernel:
        return None
    return kernel["strategy"] + (f":{kernel['orient']}" if kernel.get("orient") else "")


def build_report(gm: fx.GraphModule, state: PassState) -> Report:
    """Collect ``node.meta["ispc"]`` into a :class:`Report`."""
    rows: list[LayerReport] = []
    for node in gm.graph.nodes:
        meta = ispc_meta(node)
        layer = meta.get("layer")
        if not layer:
            continue
        gate = meta.get("gate", {})
        row = LayerReport(
            name=layer["name"], op=layer["op"], in_channels=int(layer["in_channels"]),
            out_channels=int(layer["out_channels"]), kernel=layer.get("kernel"),
            stride=layer.get("stride"), groups=int(layer.get("groups", 1)), macs=layer.get("macs"),
            cv=gate.get("cv"), rank=gate.get("rank"), gated=bool(gate.get("gated", False)),
            reason=gate.get("reason") or layer.get("reason"), threshold=gate.get("threshold"),
            k=gate.get("k"), kept_mean=gate.get("kept_mean"), kept_p10=gate.get("kept_p10"),
            kept_p90=gate.get("kept_p90"), site=layer.get("site"), cpu_kernel=_kernel_label(meta),
            out_pruned=int(meta.get("pruned_out", 0)), in_pruned=int(meta.get("pruned_in", 0)))
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
        "channels_last": runs_channels_last(gm),
    }
    notes = list(state.notes)
    if dense is None:
        notes.append("MACs unknown: no example input to measure shapes (pass calibration data)")
    else:
        notes.append("MACs count conv2d and linear layers per input at the calibration input size")
    return Report(layers=rows, summary=summary, config=cfg.to_dict(), notes=notes,
                  channel_graph=state.channel_graph)


def inspect(model: nn.Module, calibration_data: Any = None, *, config: GatingConfig | None = None,
            progress: bool | None = None) -> Report:
    """Analyse ``model`` (trace, fold BN, find sites, calibrate, rank) without rewriting it."""
    cfg = _check_config(config)
    work = _private_copy(_unwrap(model))
    state = _make_state(work, calibration_data, cfg, progress)
    gm = run_passes(work, state, ANALYSIS_PIPELINE)
    return build_report(gm, state)


def compile(model: nn.Module, calibration_data: Any = None, *, config: GatingConfig | None = None,
            backend: str = "eager", progress: bool | None = None) -> CompiledModel:
    """Compile ``model`` into a gated model that skips each input's negligible channels.

    Args:
        model: the trained ``nn.Module``; it is never modified (ispc works on an eval-mode copy).
        calibration_data: an iterable of batches (Tensors, or tuples/lists whose first item is the
            input, e.g. a DataLoader of (x, y)), or one N x C x H x W Tensor. Without it only topk
            gating at ``config.keep_ratio`` is possible and no layer ranking is done.
        config: a :class:`GatingConfig` (default: keep half the channels, threshold mode).
        backend: ``"eager"`` (PyTorch kernels), ``"inductor"`` (torch.compile of the gated graph) or
            ``"tensorrt"`` (torch-tensorrt engine for the calibration batch shape; needs CUDA and
            the ``[tensorrt]`` extra; unverified, see ``ispc.backends.tensorrt``).
        progress: show progress bars (default: when attached to a terminal).

    Returns:
        a :class:`CompiledModel` with ``.report`` and ``.graph_module``.
    """
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if backend == "tensorrt":  # fail fast, before calibrating, when TensorRT or CUDA is missing
        from .backends.tensorrt import require_tensorrt

        require_tensorrt()
    cfg = _check_config(config)
    work = _private_copy(_unwrap(model))
    state = _make_state(work, calibration_data, cfg, progress)
    gm = run_passes(work, state, COMPILE_PIPELINE)
    compiled = CompiledModel(gm, build_report(gm, state), cfg, backend=backend)
    if backend == "inductor":
        compiled.__dict__["_runner"] = torch.compile(gm, fullgraph=cfg.mode == "topk", dynamic=False)
    elif backend == "tensorrt":
        from .backends.tensorrt import compile_tensorrt

        if state.example_inputs is None:
            raise DataError("backend='tensorrt' needs calibration data: the engine is built for the "
                            "shape of an example input")
        # static batch: top-k layers gather only the kept channels (a dynamic batch would fall back
        # to the masked-dense form and gain nothing)
        compiled.__dict__["_runner"] = compile_tensorrt(compiled, state.example_inputs,
                                                        dynamic_batch=False)
    return compiled
