"""Run a model on a CUDA GPU by replaying CUDA graphs: every kernel of a forward pass in one launch.

At batch 1 a gated model on a GPU is bound by kernel launches, not arithmetic: each gated layer
launches a selection and a convolution kernel from Python, where cuDNN's dense layer is one launch.
A CUDA graph records a whole forward pass once and replays it with a single call, so neither side
pays Python or launch overhead, and gated and dense models compare on their kernels alone. The
gated layers qualify because their kernels never synchronise with the host (``torch.ops.ispc``'s
Triton kernels keep every count on the GPU; :mod:`ispc.ops.triton_gated_conv`).

- :class:`CUDAGraphModule` wraps any CUDA module (a compiled ispc model, or the dense baseline, the
  same way): per input signature (shapes, dtypes, devices) it warms the module up on a side stream
  (the Triton kernels compile and tune their tiles there: nothing can be timed during capture),
  captures one forward pass into a ``torch.cuda.CUDAGraph`` with static input buffers, and from
  then on copies the inputs in and replays. ``channels_last=True`` runs the maps channels-last
  (NHWC; the layout cuDNN's and ispc's tensor-core kernels prefer) on a copy of the module whose
  weights are channels-last too.
- ``method="reduce-overhead"``: ``torch.compile(mode="reduce-overhead")`` instead (Inductor's CUDA
  graph trees; the gated layers stay opaque operators and run their Triton kernels, without the
  fused epilogue: Inductor fuses the add and ReLU after them itself). Slower to build.
- :func:`lower` is what ``ispc.compile(..., backend="cuda_graphs")`` calls.

Outputs: by default each call returns copies (``clone_outputs=True``); with ``clone_outputs=False``
it returns the graph's own output tensors, which the next replay of the same signature overwrites
(what ``torch.compile``'s CUDA graphs do too; benchmarks use it for both sides). Calls that need
gradients, or pass keyword arguments, run the module eagerly.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import BackendUnavailableError

__all__ = ["CUDAGraphModule", "lower", "require_cuda", "METHODS"]

#: how :func:`lower` runs the model
METHODS = ("capture", "reduce-overhead")


def require_cuda(module: nn.Module | None = None) -> None:
    """Raise :class:`BackendUnavailableError` unless CUDA is present and ``module`` lives there."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend='cuda_graphs' needs an NVIDIA GPU with CUDA; torch.cuda.is_available() is "
            "False here (use backend='eager' or 'inductor')")
    if module is not None:
        devices = {t.device.type for t in list(module.parameters()) + list(module.buffers())}
        if devices and devices != {"cuda"}:
            raise BackendUnavailableError(
                f"backend='cuda_graphs' replays CUDA kernels, but the model's tensors are on "
                f"{sorted(devices)}; move the model to the GPU first (model.cuda()) and pass "
                "calibration data on the GPU")


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.dim() == 4) if isinstance(a, Tensor)
                 else ("const", repr(a)) for a in args)


class _Entry:
    """One captured forward pass: its static inputs, its outputs, and how to replay it."""

    def __init__(self, inputs: list[Tensor | None], outputs: Any, replay: Callable[[], None],
                 graph: Any = None) -> None:
        self.inputs, self.outputs, self.replay, self.graph = inputs, outputs, replay, graph


def _capture_cuda(fn: Callable[[], Any], warmup: int) -> tuple[Any, Callable[[], None], Any]:
    """Warm ``fn`` up on a side stream, capture one call in a CUDA graph: (outputs, replay,
    graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return outputs, graph.replay, graph


class CUDAGraphModule(nn.Module):
    """``module`` run by replaying CUDA graphs, one per input signature (see the module doc).

    Args:
        module: a module whose parameters and buffers are on CUDA (not modified; with
            ``channels_last=True`` a channels-last copy is made).
        channels_last: run 4-d maps channels-last (NHWC) inside the graph.
        warmup: eager calls before each capture (the first compiles and tunes the kernels).
        clone_outputs: return copies of the graph's outputs (else the graph's own tensors).
        max_graphs: signatures kept; the oldest graph is dropped beyond it.
    """

    def __init__(self, module: nn.Module, *, channels_last: bool = False, warmup: int = 3,
                 clone_outputs: bool = True, max_graphs: int = 4,
                 _capture: Callable[[Callable[[], Any], int], tuple] | None = None) -> None:
        super().__init__()
        if _capture is None:
            require_cuda(module)
        if channels_last:
            module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        self.module = module
        self.channels_last = bool(channels_last)
        self.warmup = int(warmup)
        self.clone_outputs = bool(clone_outputs)
        self.max_graphs = max(1, int(max_graphs))
        self._capture = _capture or _capture_cuda
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()

    @property
    def captured(self) -> int:
        """How many input signatures have a graph."""
        return len(self._graphs)

    def _static(self, a: Any) -> Any:
        if not isinstance(a, Tensor):
            return a
        if self.channels_last and a.dim() == 4:
            return torch.empty_like(a, memory_format=torch.channels_last).copy_(a)
        return a.detach().clone()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if kwargs or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return self.module(*args, **kwargs)
        key = _signature(args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._record(args)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            for static, a in zip(entry.inputs, args):
                if static is not None:
                    static.copy_(a)
        entry.replay()
        if self.clone_outputs:
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.outputs)
        return entry.outputs

    def _record(self, args: tuple) -> _Entry:
        statics = [self._static(a) for a in args]
        call_args = tuple(statics)

        def run() -> Any:
            with torch.no_grad():
                return self.module(*call_args)

        outputs, replay, graph = self._capture(run, self.warmup)
        return _Entry([s if isinstance(s, Tensor) else None for s in statics], outputs, replay,
                      graph)

    def extra_repr(self) -> str:
        return (f"channels_last={self.channels_last}, graphs={self.captured}, "
                f"clone_outputs={self.clone_outputs}")


def lower(compiled: nn.Module, *, method: str = "capture", channels_last: bool = False,
          warmup: int = 3, clone_outputs: bool = True) -> nn.Module:
    """A callable that runs ``compiled`` (an :class:`ispc.CompiledModel`, or any CUDA module)
    under CUDA graphs: :class:`CUDAGraphModule` (``method="capture"``) or
    ``torch.compile(mode="reduce-overhead")``. Raises :class:`BackendUnavailableError` without
    CUDA or for a model that is not on the GPU.

    Backend registry entry: ``ispc.compile(model, data, backend="cuda_graphs")`` sets the compiled
    model's runner to ``lower(compiled)``.
    """
    if method not in METHODS:
        raise BackendUnavailableError(f"unknown CUDA-graph method {method!r}; one of {METHODS}")
    gm = getattr(compiled, "graph_module", compiled)
    require_cuda(gm)
    if method == "reduce-overhead":
        module = copy.deepcopy(gm).to(memory_format=torch.channels_last) if channels_last else gm
        return torch.compile(module, mode="reduce-overhead", dynamic=False)
    return CUDAGraphModule(gm, channels_last=channels_last, warmup=warmup,
                           clone_outputs=clone_outputs)
