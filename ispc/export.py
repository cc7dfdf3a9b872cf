"""``torch.export`` of a compiled model, with a dynamic batch dimension.

The gated convolution is one opaque ``torch.ops.ispc.gated_conv2d`` node whose fake implementation
returns the dense output shape, so exporting a :class:`~ispc.compiled.CompiledModel` needs no
special handling of data-dependent shapes: in both gating modes (``threshold`` and ``topk``) the
exported graph holds one ``torch.ops.ispc.gated_conv2d.default`` call per gated layer, and the batch
dimension can be left symbolic. The exported program runs the same CPU/CUDA kernels as eager mode,
so its outputs equal the compiled model's.

    >>> ep = ispc.export.export_program(compiled, (x,))        # dynamic batch
    >>> ep.module()(torch.randn(7, 3, 32, 32))                 # any batch size
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, fx, nn
from torch.export import Dim, ExportedProgram

from .compiled import CompiledModel

__all__ = ["export_program", "gated_nodes", "batch_dynamic_shapes", "as_example_inputs",
           "graph_module_of", "eval_mode", "GATED_OP"]

#: the node target every exported gated layer has (what the ONNX and TensorRT lowerings match)
GATED_OP = torch.ops.ispc.gated_conv2d.default


def graph_module_of(model: CompiledModel | nn.Module) -> nn.Module:
    """The module to export: a compiled model's ``graph_module`` (never its backend runner)."""
    if isinstance(model, CompiledModel):
        return model.graph_module
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected an ispc.CompiledModel or nn.Module, got {type(model).__name__}")


def as_example_inputs(example_inputs: Any) -> tuple:
    """``example_inputs`` (one Tensor, or a tuple/list of positional inputs) as a tuple."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a Tensor or a tuple of positional inputs, got "
                    f"{type(example_inputs).__name__}")


def _batch_of(args: tuple) -> int | None:
    sizes = {int(a.shape[0]) for a in args if isinstance(a, Tensor) and a.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(f"tensor inputs disagree on the batch size: {sorted(sizes)}; "
                         "pass dynamic_batch=False to export them with static shapes")
    return sizes.pop() if sizes else None


def _widen_batch(args: tuple, n: int) -> tuple:
    """Repeat every tensor input along dim 0 to batch ``n`` (export specializes sizes 0 and 1)."""
    out = []
    for a in args:
        if isinstance(a, Tensor) and a.dim() > 0:
            reps = -(-n // a.shape[0])
            a = a.repeat(reps, *([1] * (a.dim() - 1)))[:n]
        out.append(a)
    return tuple(out)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``module`` (and its children) in eval mode; restore every flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def batch_dynamic_shapes(args: tuple, name: str = "batch") -> tuple:
    """``dynamic_shapes`` for :func:`torch.export.export`: dim 0 of every tensor input symbolic."""
    batch = Dim(name)
    return tuple({0: batch} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)


def export_program(compiled: CompiledModel | nn.Module, example_inputs: Any, *,
                   dynamic_batch: bool = True, strict: bool = False) -> ExportedProgram:
    """Export a compiled model with :func:`torch.export.export`.

    Args:
        compiled: an :class:`ispc.CompiledModel` (its ``graph_module`` is exported) or any module.
        example_inputs: one input Tensor or a tuple of positional inputs.
        dynamic_batch: make dim 0 of every tensor input symbolic, so the program accepts any
            batch size (including 1). Example batches of size 1 are repeated to size 2 for tracing,
            because torch.export specializes dimensions of size 0 and 1.
        strict: passed to :func:`torch.export.export` (non-strict tracing by default).

    Returns:
        the :class:`torch.export.ExportedProgram`, traced in eval mode; every gated layer is one
        ``torch.ops.ispc.gated_conv2d.default`` node (see :data:`GATED_OP`).
    """
    module = graph_module_of(compiled)
    args = as_example_inputs(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        n = _batch_of(args)
        if n == 0:
            raise ValueError("example_inputs have batch size 0; give at least one example")
        if n is not None:
            if n < 2:
                args = _widen_batch(args, 2)
            dynamic_shapes = batch_dynamic_shapes(args)
    with eval_mode(module), torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)


def gated_nodes(ep: ExportedProgram | fx.GraphModule) -> list[fx.Node]:
    """The ``torch.ops.ispc.gated_conv2d.default`` nodes of an exported program or graph module."""
    graph = ep.graph if isinstance(ep, (ExportedProgram, fx.GraphModule)) else ep
    return [n for n in graph.nodes if n.op == "call_function" and n.target is GATED_OP]
