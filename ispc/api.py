"""The public entry points: :func:`compile` and :func:`inspect` (the work is in
:mod:`ispc.pipeline`; backends in :mod:`ispc.backends`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import pipeline
from .backends import BACKENDS, get_backend
from .compiled import CompiledModel
from .config import GatingConfig, checked_options
from .report import Report

__all__ = ["compile", "inspect", "BACKENDS"]


@checked_options
def inspect(model: nn.Module, calibration_data: Any = None, *, config: GatingConfig | None = None,
            progress: bool | None = None) -> Report:
    """Analyse ``model`` (trace, fold BN, find sites, calibrate, rank) without rewriting it."""
    gm, state = pipeline.run(model, calibration_data, config=config, pipeline="inspect",
                             progress=progress)
    return pipeline.build_report(gm, state)


@checked_options
def compile(model: nn.Module, calibration_data: Any = None, *, config: GatingConfig | None = None,
            backend: str = "eager", progress: bool | None = None) -> CompiledModel:
    """Compile ``model`` into a gated model that skips each input's negligible channels.

    Args:
        model: the trained ``nn.Module``; it is never modified (ispc works on an eval-mode copy).
        calibration_data: an iterable of batches (Tensors, or tuples/lists whose first item is the
            input, e.g. a DataLoader of (x, y)), or one N x C x H x W Tensor. Without it only topk
            gating at ``config.keep_ratio`` is possible and no layer ranking is done.
        config: a :class:`GatingConfig` (default: keep half the channels, threshold mode).
        backend: a name in :data:`ispc.backends.BACKENDS`: ``"eager"`` (PyTorch kernels),
            ``"inductor"`` (torch.compile of the gated graph) or ``"tensorrt"`` (torch-tensorrt
            engine for the calibration batch shape; needs CUDA and the ``[tensorrt]`` extra;
            unverified, see ``ispc.backends.tensorrt``) or ``"cuda_graphs"`` (a model on the GPU
            replayed as CUDA graphs, one per input shape: ``ispc.backends.cuda_graphs``).
        progress: show progress bars (default: when attached to a terminal).

    Returns:
        a :class:`CompiledModel` with ``.report`` and ``.graph_module``.
    """
    runner = get_backend(backend)
    runner.check(pipeline.unwrap(model))  # fail fast, before calibrating (no TensorRT, no CUDA)
    gm, state = pipeline.run(model, calibration_data, config=config, pipeline="compile",
                             progress=progress)
    compiled = CompiledModel(gm, pipeline.build_report(gm, state), state.config, backend=runner.name)
    runner.attach(compiled, state.example_inputs)
    return compiled
