"""Linear layers as convolutions, so that their input channels can be gated too.

A classifier's ``nn.Linear`` that reads ``flatten(x)`` of a ``C x H x W`` feature map is the
``H x W`` convolution of ``x`` with no padding: each of its ``C`` input channels owns ``H * W``
columns of the weight. At batch 1 such a layer is a matrix-vector product bound by memory (VGG-16's
first classifier layer reads 411 MB of weights per image, ~14% of the model's time on 2 cores), so a
skipped channel is weight bytes never read. A linear layer on a plain feature vector (VGG's second
classifier layer, a ResNet's ``fc`` after ``flatten``) is the 1x1 convolution of that vector seen as
``F x 1 x 1``.

With ``GatingConfig(gate_linear=True)`` this pass puts a :class:`~ispc.modules.LinearConv2d` (the
same weights, viewed) under the linear layer's name, feeds it the feature map (or the vector
reshaped to ``N x F x 1 x 1``) and flattens its ``N x out x 1 x 1`` result for the nodes after it.
Every later pass then treats it as a convolution. Ungated, it still runs as a linear layer.

Only linear layers called once, on a 2-d input whose shape the calibration batch told and whose
first dimension is the batch, are rewritten; the rest keep their reason in the report. (A linear
layer over the last dimension of a 3-d or larger input is gated as it is: ``GatedLinear``.)
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ispc.modules import LinearConv2d
from ispc.records import LinearAsConv

from .base import (PassState, module_call_counts, node_shape, records, register_pass,
                   replace_submodule)

__all__ = ["linear_as_conv", "flattened_map"]

_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_FLATTEN_FUNCS = {torch.flatten, torch.reshape, torch.ops.aten.flatten.using_ints,
                  torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                  torch.ops.aten._unsafe_view.default}


def flattened_map(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ``N x C x H x W`` node that ``node`` flattens to ``N x (C*H*W)``, or None.

    A flatten from dim 1, or a view/reshape to two dims that keeps the batch: all of them lay the
    channels out as ``flatten(1)`` does (row-major), whatever the call's spelling.
    """
    is_flat = (
        (node.op == "call_function" and node.target in _FLATTEN_FUNCS)
        or (node.op == "call_method" and node.target in _FLATTEN_METHODS)
        or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Flatten)))
    if not is_flat or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, out = node_shape(node.args[0]), node_shape(node)
    if src is None or out is None or len(src) != 4 or len(out) != 2:
        return None
    n, c, h, w = src
    return node.args[0] if out == (n, c * h * w) else None


@register_pass("linear_as_conv")
def linear_as_conv(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Rewrite eligible ``nn.Linear`` calls as :class:`LinearConv2d` (``config.gate_linear``)."""
    if not state.config.gate_linear or state.example_inputs is None:
        return gm
    calls = module_call_counts(gm)
    graph = gm.graph
    changed = False
    batch = int(state.example_inputs[0].shape[0])
    for node in list(graph.nodes):
        if node.op != "call_module" or calls.get(node.target, 0) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        lin = gm.get_submodule(node.target)
        x = node.args[0]
        shape = node_shape(x)
        if (type(lin) is not nn.Linear or not isinstance(x, fx.Node) or shape is None
                or len(shape) != 2 or shape[0] != batch):
            continue  # (a 2-d input of more rows than the batch holds tokens, not instances)
        fmap = flattened_map(gm, x)
        with graph.inserting_before(node):
            if fmap is not None:
                _, c, h, w = node_shape(fmap)
                src = fmap
            else:
                c, h, w = shape[1], 1, 1
                src = graph.call_method("reshape", (x, (-1, c, 1, 1)))
        replace_submodule(gm, node.target, LinearConv2d(lin, c, (h, w)))
        node.args = (src,)
        with graph.inserting_after(node):
            flat = graph.call_function(torch.flatten, (node, 1))
        node.replace_all_uses_with(flat, delete_user_cb=lambda user: user is not flat)
        if fmap is not None and not x.users:  # the flatten the linear layer read
            graph.erase_node(x)
        records(node).linear = LinearAsConv(in_features=lin.in_features, channels=c, kernel=(h, w))
        changed = True
    if not changed:
        return gm
    gm.recompile()
    with torch.no_grad():  # shapes of the new nodes (and the same ones for the rest)
        ShapeProp(gm).propagate(*state.example_inputs)
    return gm

