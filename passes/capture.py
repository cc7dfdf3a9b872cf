"""Capture: trace the model with torch.fx and record tensor shapes in ``node.meta``."""
from __future__ import annotations

import traceback

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ispc.errors import DataError, TraceError

from .base import PassState, register_pass

__all__ = ["capture", "IspcTracer"]


class IspcTracer(fx.Tracer):
    """A tracer that keeps the user's leaf modules whole and remembers where tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.module_stack_names: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.module_stack_names.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.module_stack_names[-1]
            raise
        finally:
            self.module_stack_names.pop()


def _failing_line(exc: BaseException) -> str:
    """The user's source line where tracing failed (the deepest frame outside torch)."""
    here = __file__.rsplit("/", 1)[0]
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith(here)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def trace(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; an untraceable construct becomes a :class:`TraceError`."""
    tracer = IspcTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # FX raises many kinds; all mean "cannot trace"
        where = tracer.failed_in or ""
        where_txt = f"in submodule '{where}' ({type(model.get_submodule(where)).__name__})" if where \
            else f"in {type(model).__name__}.forward"
        fix = (f"wrap it as a leaf module: ispc.GatingConfig(leaf_modules=("
               f"{type(model.get_submodule(where)).__name__},)) so it runs as one opaque call"
               if where else "make forward traceable (no Python control flow on tensor values) or "
               "split the untraceable part into a submodule and pass it in GatingConfig.leaf_modules")
        raise TraceError(f"torch.fx cannot trace the model {where_txt}{_failing_line(exc)}: "
                         f"{type(exc).__name__}: {exc}. Fix: {fix}.") from None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


@register_pass("capture")
def capture(module: nn.Module, state: PassState) -> fx.GraphModule:
    """Trace ``module`` (already a private eval-mode copy) and propagate shapes of the example."""
    gm = trace(module, state.config.leaf_modules)
    if state.example_inputs is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*state.example_inputs)
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in state.example_inputs)
            raise DataError(f"the model cannot run on a calibration batch of shape {shapes}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                            "Fix: give calibration batches the model accepts (channels, spatial size, "
                            "dtype and device of its parameters).") from None
    return gm
