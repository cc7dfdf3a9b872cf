"""Capture: the model as a graph, with the tensor shapes of the calibration example in node.meta.

Two ways, chosen by ``GatingConfig.capture``:

- ``"fx"``: ``torch.fx`` symbolic tracing (the user's modules stay ``call_module`` nodes);
- ``"export"``: ``torch.export`` on the first calibration batch, its batch dimension dynamic where
  the model allows (else static, with a note), called as the data names it (``pixel_values=x`` for
  a batch that is a dict); the ATen graph is lifted back to the model's modules by the ``lift``
  pass (``passes/lift.py``);
- ``"auto"`` (default): fx where it traces, its graph runs on the example and it sees every
  convolution and linear layer; else export. Most Hugging Face models need export
  (``return_dict`` arguments and shape checks on the input stop fx); so do models whose layers
  run inside a call fx keeps whole (``torch.fx.wrap``: torchvision's Swin attention;
  ``nn.MultiheadAttention``: ViT).

An ``ExportedProgram`` (``ispc.pipeline.unwrap`` takes its ``.module()``) or the ``.module()`` of
one given as the model is taken as captured. ``state.capture`` says which capture ran (the
report's summary shows it). A calibration batch the model cannot take is a one-line
:class:`~ispc.errors.DataError` naming what the model expects and what it got; torch.fx's
tracebacks never reach stderr.
"""
from __future__ import annotations

import contextlib
import io
import logging
import traceback
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ispc.errors import DataError, TraceError

from .base import PassState, register_pass

__all__ = ["capture", "trace", "IspcTracer", "export_graph", "is_exported_graph",
           "propagate_shapes", "hidden_layers", "fx_hidden_layers"]


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def hidden_layers(module: nn.Module) -> list[str]:
    """The convolutions and linear layers inside ``module`` (what a leaf hides from ispc)."""
    return [n for n, m in module.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]


def _trace_once(model: nn.Module, leaf_types: tuple[type, ...]):
    tracer = IspcTracer(leaf_types)
    try:
        return tracer.trace(model), tracer, None
    except Exception as exc:  # noqa: BLE001 -- FX raises many kinds; all mean "cannot trace"
        return None, tracer, exc


def _working_leaves(model: nn.Module, leaf_types: tuple[type, ...], first: str) -> tuple[type, ...] | None:
    """Leaf classes, starting with the class of the submodule ``first`` where tracing failed,
    with which the model traces, none of them hiding a convolution or linear layer ispc could
    gate; None if there is no such set (a suggestion must work, and never hide gated layers)."""
    leaves, where = tuple(leaf_types), first
    for _ in range(6):
        sub = model.get_submodule(where)
        if hidden_layers(sub) or type(sub) in leaves:
            return None
        leaves += (type(sub),)
        graph, tracer, exc = _trace_once(model, leaves)
        if exc is None:
            return leaves[len(leaf_types):]
        where = tracer.failed_in
        if not where:
            return None
    return None


def trace(model: nn.Module, leaf_types: tuple[type, ...] = (), *,
          export_fix: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model``; an untraceable construct becomes a :class:`TraceError`
    whose suggested fix works (``export_fix``: capture='export' may be suggested)."""
    graph, tracer, exc = _trace_once(model, leaf_types)
    if exc is None:
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    where = tracer.failed_in or ""
    sub = model.get_submodule(where) if where else None
    where_txt = f"in submodule '{where}' ({type(sub).__name__})" if where \
        else f"in {type(model).__name__}.forward"
    leaves = _working_leaves(model, leaf_types, where) if where else None
    if leaves:
        names = ", ".join(t.__name__ for t in leaves)
        fix = (f"let it run as one opaque call: ispc.GatingConfig(leaf_modules=({names},)) "
               "(it holds no layer ispc would gate)")
    elif export_fix:
        fix = ("ispc.GatingConfig(capture='export') captures it with torch.export instead "
               "(needs calibration data)")
    else:
        hidden = hidden_layers(sub) if sub is not None else []
        held = (f" ('{where}' holds {len(hidden)} convolution/linear layer(s): as a leaf they would "
                "stay hidden and dense)" if hidden else "")
        fix = ("make forward traceable (no Python control flow on tensor values or shapes: "
               "torch.where instead of if) or move the untraceable part into a submodule without "
               f"convolutions and pass its class in GatingConfig.leaf_modules{held}")
    err = TraceError(f"torch.fx cannot trace the model {where_txt}{_failing_line(exc)}: "
                     f"{_first_line(exc)}. Fix: {fix}.")
    err.short = f"cannot trace {where_txt}"  # what the report's capture note says
    raise err from None


def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """ShapeProp on ``inputs``, quietly: torch.fx prints the traceback of a failing node on
    stderr itself, and the caller reports the error in one line."""
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def is_exported_graph(module: nn.Module) -> bool:
    """Whether ``module`` is an ATen graph (the ``.module()`` of an ``ExportedProgram``)."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "aten" for n in module.graph.nodes)


def _clean(exported: fx.GraphModule) -> fx.GraphModule:
    """An exported ``.module()`` as a plain GraphModule over the same tensors: without its
    input guards (a call and hooks that check the export-time shapes: ispc checks inputs
    itself) and without hooks."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            owner, _, leaf = node.target.rpartition(".")
            root[node.target] = getattr(exported.get_submodule(owner), leaf)
    gm = fx.GraphModule(root, graph, type(exported).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(exported, attr):
            setattr(gm, attr, getattr(exported, attr))
    return gm


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing from torch.export reaches stderr (its warnings, and the graphs its loggers print
    when it fails): the caller reports the outcome in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _batch(x: Tensor, n: int) -> Tensor:
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def export_graph(model: nn.Module, example: Tensor, name: str | None = None) -> tuple[fx.GraphModule, str]:
    """``torch.export`` of ``model`` called on ``example`` (as keyword ``name``, or positionally),
    the batch dimension dynamic where the model allows; returns the cleaned ``.module()`` and a
    label saying how the batch was captured. Raises what ``torch.export`` raises."""
    from torch.export import Dim  # torch.export imports lazily (it loads much of torch._dynamo)

    def run(x: Tensor, dynamic: bool):
        args, kwargs = ((), {name: x}) if name else ((x,), {})
        shapes = None
        if dynamic:
            spec = {0: Dim("batch")}
            shapes = {name: spec} if name else (spec,)
        with _quiet():
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)

    try:
        # torch.export specializes a dimension of size 1: trace at batch 2 at least
        ep = run(_batch(example, max(2, example.shape[0])), True)
        label = "export (dynamic batch)"
    except Exception as exc:  # noqa: BLE001 -- any failure: try once more with static shapes
        ep = run(example, False)
        label = (f"export (static batch {example.shape[0]}: the batch dimension could not stay "
                 f"dynamic, {_first_line(exc)[:160]})")
    return _clean(ep.module()), label


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer takes, for an error message ('' when unknown)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return (f"; the model expects N x {m.in_channels} x H x W (its first convolution "
                    f"'{name}' takes {m.in_channels} channels)")
        if isinstance(m, nn.Linear):
            return (f"; the model expects N x ... x {m.in_features} (its first linear layer "
                    f"'{name}' takes {m.in_features} features)")
    return ""


def _check_runs(model: nn.Module, state: PassState) -> None:
    """Run the model itself on the example; a failure there is the data's: a DataError."""
    x = state.example_inputs[0]
    name = state.input_name
    try:
        with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            model(**{name: x}) if name else model(x)
    except Exception as exc:  # noqa: BLE001 -- any failure of the model on the data
        raise DataError(f"the model cannot run on calibration batch 0 of shape {tuple(x.shape)} "
                        f"({x.dtype}){_expected_input(model)}: {_first_line(exc)}. Fix: give "
                        "calibration batches the model accepts (rank, channels, spatial size, "
                        "dtype and device of its parameters), preprocessed as at training time"
                        ) from None


def _leaf_notes(gm: fx.GraphModule, leaf_types: tuple[type, ...], state: PassState) -> None:
    if not leaf_types:
        return
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, leaf_types) and (hidden := hidden_layers(m)):
            shown = ", ".join(f"{node.target}.{h}" for h in hidden[:8])
            more = f" and {len(hidden) - 8} more" if len(hidden) > 8 else ""
            state.notes.append(
                f"leaf_modules: '{node.target}' ({type(m).__name__}) hides {len(hidden)} "
                f"convolution/linear layer(s) ispc can neither see nor gate: {shown}{more} (their "
                "MACs are not counted); remove its class from leaf_modules, or use "
                "GatingConfig(capture='export')")


_LAYER_FUNCS = {torch.nn.functional.conv2d, torch.conv2d, torch.nn.functional.linear,
                torch._C._nn.linear}


def fx_hidden_layers(gm: fx.GraphModule, model: nn.Module, leaf_types: tuple[type, ...] = ()) -> list[str]:
    """The model's convolutions and linear layers a torch.fx graph cannot see: neither called
    as modules nor read by a convolution/linear call, because a function torch.fx keeps whole
    (``torch.fx.wrap``: torchvision's Swin attention) or a ``torch.nn`` module it does not trace
    into (``nn.MultiheadAttention``) runs them. Layers inside the user's own leaf modules are
    left out (they have their note)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {a.target for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYER_FUNCS
            for a in n.all_input_nodes if a.op == "get_attr"}
    leaves = [p for p, m in model.named_modules() if p and leaf_types and isinstance(m, leaf_types)]
    out = []
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or path in called or f"{path}.weight" in read:
            continue
        if any(path.startswith(leaf + ".") for leaf in leaves):
            continue
        out.append(path)
    return out


def _from_export(module: nn.Module, state: PassState, why: str | None,
                 fx_fix: str | None = None) -> fx.GraphModule:
    x = state.example_inputs[0]
    try:
        gm, label = export_graph(module, x, state.input_name)
    except Exception as exc:  # noqa: BLE001
        _check_runs(module, state)  # the data's fault: a DataError
        tried = f"torch.fx {why}; " if why else ""
        fix = fx_fix or ("make forward exportable (torch.export's error names the construct), or "
                         "wrap the model in a module whose forward takes one tensor")
        raise TraceError(f"ispc cannot capture the model: {tried}torch.export: "
                         f"{_first_line(exc)[:300]}. Fix: {fix}") from None
    state.capture = label
    if why:
        state.notes.append(f"capture: torch.export (torch.fx {why[:200]})")
    if state.config.leaf_modules:
        state.notes.append("capture: leaf_modules apply to torch.fx only; torch.export traced "
                           "into them")
    if label.startswith("export (static"):
        state.notes.append(f"capture: {label[8:-1]}; the compiled model takes batches of "
                           f"{x.shape[0]} only")
    _propagate(gm, module, state)
    return gm


def _propagate(gm: fx.GraphModule, module: nn.Module, state: PassState) -> None:
    try:
        propagate_shapes(gm, state.example_inputs)
    except Exception as exc:  # noqa: BLE001
        _check_runs(module, state)
        raise DataError(f"the captured graph cannot run on calibration batch 0 of shape "
                        f"{tuple(state.example_inputs[0].shape)}: {_first_line(exc)}. Fix: "
                        "calibrate with batches of the shape the model was exported for, or export "
                        "it with a dynamic batch dimension") from None


@register_pass("capture")
def capture(module: nn.Module, state: PassState) -> fx.GraphModule:
    """Capture ``module`` (already a private eval-mode copy) as a graph with shapes."""
    cfg = state.config
    if is_exported_graph(module):
        gm = _clean(module)
        state.capture = "exported program"
        if state.example_inputs is not None:
            _propagate(gm, gm, state)
        return gm
    has_data = state.example_inputs is not None
    if cfg.capture == "export":
        if not has_data:
            raise DataError("GatingConfig(capture='export') traces the model on a calibration "
                            "batch: pass calibration_data")
        return _from_export(module, state, None)
    try:
        gm = trace(module, cfg.leaf_modules, export_fix=cfg.capture == "fx" or not has_data)
    except TraceError as exc:
        if cfg.capture == "fx" or not has_data:
            raise
        fix = str(exc).partition(". Fix: ")[2].rstrip(".") or None
        return _from_export(module, state, getattr(exc, "short", str(exc).split(". Fix:")[0]), fix)
    state.capture = "fx"
    _leaf_notes(gm, cfg.leaf_modules, state)
    if not has_data:
        return gm
    try:
        propagate_shapes(gm, state.example_inputs)
    except Exception as exc:  # noqa: BLE001
        _check_runs(module, state)  # the model itself fails on the data: a DataError
        why = f"traced it, but its graph fails on calibration batch 0 ({_first_line(exc)[:160]})"
        if cfg.capture == "fx":
            raise TraceError(f"torch.fx {why} although the model runs on it. Fix: "
                             "GatingConfig(capture='export')") from None
        return _from_export(module, state, why)
    hidden = fx_hidden_layers(gm, module, cfg.leaf_modules)
    if hidden and cfg.capture == "auto":
        # torch.export sees into the calls torch.fx keeps whole: take its graph if it captures
        shown = ", ".join(hidden[:4]) + (f" and {len(hidden) - 4} more" if len(hidden) > 4 else "")
        try:
            gm_export, label = export_graph(module, state.example_inputs[0], state.input_name)
            propagate_shapes(gm_export, state.example_inputs)
        except Exception:  # noqa: BLE001 -- keep the fx graph, and say what it cannot see
            state.notes.append(f"capture: torch.fx cannot see {len(hidden)} convolution/linear "
                               f"layer(s) inside calls it keeps whole ({shown}), and torch.export "
                               "cannot capture the model: they are neither counted nor gated")
            return gm
        state.capture = label
        state.notes.append(f"capture: torch.export (torch.fx keeps {len(hidden)} convolution/"
                           f"linear layer(s) inside calls it cannot see into: {shown})")
        return gm_export
    return gm
