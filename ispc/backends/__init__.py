"""Backends: how a compiled model runs. One registry, :data:`BACKENDS` (name -> :class:`Backend`),
serves ``ispc.compile(backend=...)``, ``ispc.load`` and the command line's ``--backend``.

Exporters that write files rather than run the model live beside it: :mod:`ispc.backends.onnx`
(``export_onnx``) and :mod:`ispc.backends.tensorrt` (the converters ``"tensorrt"`` uses, and
``save_engine``/``load_engine``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..compiled import CompiledModel
from ..dense_route import runner_for as _route_runner
from ..errors import BackendUnavailableError, DataError
from ..native_plan import runner_for as _native_runner
from .cuda_graphs import lower as lower_cuda_graphs
from .cuda_graphs import require_cuda
from .tensorrt import compile_tensorrt, require_tensorrt

__all__ = ["Backend", "BACKENDS", "get_backend"]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """How to run a compiled model.

    ``check(model)`` fails fast (before any calibration) where the backend cannot run here or
    cannot run ``model`` (the user's model, unwrapped);
    ``attach(compiled, example_inputs)`` gives ``compiled`` its runner (``example_inputs``: the
    first calibration batch, or None); ``reloads``: ``ispc.load`` attaches it again to a model
    read from an archive (it needs nothing the archive does not hold), else the loaded model runs
    eagerly, with a note in its report.
    """

    name: str
    help: str
    attach: Callable[[CompiledModel, tuple | None], None] = _nothing
    check: Callable[[Any], Any] = _nothing
    reloads: bool = True


def _eager(compiled: CompiledModel, example: tuple | None) -> None:
    compiled.use_runner(_route_runner(compiled.graph_module) or _native_runner(compiled))


def _inductor(compiled: CompiledModel, example: tuple | None) -> None:
    compiled.use_runner(torch.compile(compiled.graph_module, fullgraph=compiled.config.mode == "topk",
                                      dynamic=False))


def _cuda_graphs(compiled: CompiledModel, example: tuple | None) -> None:
    compiled.use_runner(lower_cuda_graphs(compiled))


def _tensorrt(compiled: CompiledModel, example: tuple | None) -> None:
    if example is None:
        raise DataError("backend='tensorrt' needs calibration data: the engine is built for the "
                        "shape of an example input")
    # static batch: top-k layers gather only the kept channels (a dynamic batch would fall back
    # to the masked-dense form and gain nothing)
    compiled.use_runner(compile_tensorrt(compiled, example, dynamic_batch=False))


#: every backend by name
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "PyTorch eager, with ispc's CPU kernels (default)", _eager),
    Backend("inductor", "torch.compile of the gated graph (fullgraph in topk mode)", _inductor),
    Backend("tensorrt", "torch-tensorrt engines for the calibration batch shape (needs CUDA and "
            "the [tensorrt] extra; never run yet, see ispc.backends.tensorrt)", _tensorrt,
            lambda model: require_tensorrt(), reloads=False),
    Backend("cuda_graphs", "a model on the GPU replayed as CUDA graphs, one per input shape "
            "(ispc.backends.cuda_graphs; never run on a GPU yet)", _cuda_graphs, require_cuda,
            reloads=False),
)}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is a :class:`BackendUnavailableError`."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return backend
