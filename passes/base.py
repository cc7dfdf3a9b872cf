"""Pass infrastructure: the state that flows through the pipeline and the pass registry.

Every pass has one signature, ``pass_fn(gm, state) -> GraphModule``. Analysis passes write their
findings as typed records into ``node.meta["ispc"]`` (:mod:`ispc.records`, one
:class:`~ispc.records.NodeRecords` per node); transform passes read them, and set module attributes
from them (:func:`apply_gate`, :func:`apply_kernel`). The state carries what is not a property of a
node: the config, the calibration stream, notes for the report.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ispc.config import GatingConfig
from ispc.errors import IspcError, PassError
from ispc.modules import ORIENTATIONS, GatedConv2d, GatedLinear
from ispc.records import GateDecision, KernelChoice, records

__all__ = ["PassState", "Pass", "PASSES", "register_pass", "run_passes", "records", "apply_gate",
           "apply_kernel", "module_call_counts", "replace_submodule", "node_shape",
           "run_with_pre_hooks"]


@dataclass
class PassState:
    """Mutable state of one compilation (the config itself is frozen)."""

    config: GatingConfig
    #: one example input (the first calibration batch); None when compiling without data
    example_inputs: tuple[torch.Tensor, ...] | None = None
    #: the remaining calibration batches (tensors), consumed once by the calibrate pass
    calibration: Iterator[torch.Tensor] | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    calibration_samples: int = 0
    #: calibration inputs kept for passes that must see the data again (bounded, see calibrate)
    calibration_cache: list[torch.Tensor] = field(default_factory=list)
    #: networkx DiGraph of channel flow, written by find_sites
    channel_graph: Any = None
    #: the gated layers the refine pass last chose thresholds for (it skips an unchanged set)
    refined_gates: frozenset[str] | None = None
    #: the keyword the model takes its input by (calibration batches that are dicts, e.g.
    #: ``pixel_values``); None: the first positional argument
    input_name: str | None = None
    #: which capture made the graph (``fx``, ``export (dynamic batch)``, ...; written by capture)
    capture: str | None = None
    #: the user's model as given (unwrapped; never run nor changed): what the dense route exports
    source: nn.Module | None = None
    #: the passes still to run after the one running (written by :func:`run_passes`; None outside
    #: a pipeline): what a whole-model timing applies to see the model as it will be built
    pending: tuple[str, ...] | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration_samples > 0


Pass = Callable[[nn.Module, PassState], fx.GraphModule]

#: name -> pass, in registration order (the default pipeline order)
PASSES: dict[str, Pass] = {}
#: the passes registered with ``builds=True``
BUILDS: set[str] = set()


def register_pass(name: str, *, builds: bool = False) -> Callable[[Pass], Pass]:
    """Register a pass under ``name`` (decorator). ``builds``: the pass changes how fast the
    model runs and decides nothing a timing should wait for (kernel swaps, fusions), so a
    whole-model timing taken earlier in the pipeline applies it to the copy it times
    (:func:`build_passes`)."""

    def deco(fn: Pass) -> Pass:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered")
        PASSES[name] = fn
        if builds:
            BUILDS.add(name)
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def run_passes(module: nn.Module, state: PassState, names: Sequence[str]) -> fx.GraphModule:
    """Run the named passes in order.

    A pass that fails says which it was: an :class:`~ispc.errors.IspcError` it raises on purpose
    keeps its type and one-line message and gets ``pass_name`` and ``passes_before``; anything else
    is re-raised as a :class:`~ispc.errors.PassError` naming the pass and the passes before it.
    """
    gm = module
    done: list[str] = []
    names = tuple(names)
    for i, name in enumerate(names):
        state.pending = names[i + 1:]
        try:
            gm = PASSES[name](gm, state)
        except IspcError as exc:
            exc.pass_name, exc.passes_before = name, tuple(done)
            raise
        except Exception as exc:
            before = ", ".join(done) or "none"
            raise PassError(f"ispc pass {name!r} failed (passes run before it: {before}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                            pass_name=name, passes_before=tuple(done)) from exc
        done.append(name)
    state.pending = None
    return gm  # type: ignore[return-value]


def build_passes(state: PassState) -> tuple[str, ...]:
    """The ``builds`` passes still to run in ``state``'s pipeline, in its order. Outside a pipeline
    there is no order to follow (registration order is import order, not the pipeline's), so the
    caller must set ``state.pending``."""
    if state.pending is None:
        raise ValueError("build_passes outside a pipeline: set PassState.pending to the passes "
                         "that are still to run (e.g. the rest of ispc.pipeline.COMPILE)")
    return tuple(n for n in state.pending if n in BUILDS)


def apply_gate(node: fx.Node, gate: GateDecision, module: nn.Module | None = None) -> None:
    """Record ``gate`` for ``node``; a gated ``module`` takes its threshold and k from it (k at
    most the input channels it still reads, see ``prune_dead``)."""
    records(node).gate = gate
    if isinstance(module, GatedConv2d) and gate.gated:
        module.threshold = float(gate.threshold) if gate.threshold is not None else 0.0
        module.k = min(int(gate.k), module.in_channels) if gate.k is not None else 0


def apply_kernel(node: fx.Node, choice: KernelChoice, module: nn.Module | None = None) -> None:
    """Record ``choice`` for ``node``; a gated ``module`` runs that kernel."""
    records(node).kernel = choice
    if isinstance(module, GatedLinear):  # its nhwc kernel's tile follows module.positions
        module.set_strategy(choice.strategy, ORIENTATIONS.get(choice.orient))
    elif isinstance(module, GatedConv2d):
        shape = node_shape(node)  # output positions: the nhwc kernel's register tile
        hw = shape[-1] * shape[-2] if shape is not None and len(shape) == 4 else None
        module.set_strategy(choice.strategy, ORIENTATIONS.get(choice.orient), out_hw=hw,
                            winograd=choice.winograd)


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each submodule (shared modules are called more than once)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def replace_submodule(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (nodes calling ``name`` now call it)."""
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def node_shape(node: object) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for ``node`` (``meta["tensor_meta"]``), or None."""
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(tm, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def run_with_pre_hooks(gm: nn.Module, names: list[str], hook: Callable[[str, nn.Module, tuple], None],
                       inputs: list[torch.Tensor]) -> None:
    """Run ``inputs`` through ``gm`` without gradients, calling ``hook(name, module, args)`` before
    each named submodule runs (what passes that re-read the calibration cache observe)."""
    handles = [gm.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a))
               for n in names]
    try:
        with torch.no_grad():
            for x in inputs:
                gm(x)
    finally:
        for h in handles:
            h.remove()
