"""A graph rebuilt from an archive (ATen calls) made into modules again, as a compiled model has
them: ``ispc::gated_conv2d`` calls become :class:`~ispc.modules.GatedConv2d` (or, between the two
permutes a :class:`~ispc.modules.GatedLinear` exports as, that layer again), ``aten.conv2d`` and
``aten.linear`` with stored weights ``nn.Conv2d``/``nn.Linear``, ``aten.max_pool2d`` the pooling
module ``lower_pools`` uses; so ``gated_modules()``, ``measure()`` and the kernels work after
``ispc.load``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from ..export import GATED_OP
from ..modules import MODE_CODES, SALIENCY_CODES, GatedConv2d, GatedLinear, fast_max_pool

__all__ = ["modularize"]


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise ValueError(f"missing argument {arg.name}")
    return out


def _attr(gm: fx.GraphModule, a: Any) -> Tensor | None:
    """The tensor behind a get_attr node used only once (else None: leave the call alone)."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1):
        return None
    *path, leaf = a.target.split(".")
    mod = gm.get_submodule(".".join(path))
    value = getattr(mod, leaf, None)
    return value if isinstance(value, Tensor) else None


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v) and len(v) in (1, 2):
        return (v[0], v[-1])
    return None


def _place(gm: fx.GraphModule, attrs: list[fx.Node], module: nn.Module, taken: set[str],
           fallback: str) -> str:
    """Where to put ``module``: the container its weights came from, if it held nothing else."""
    prefixes = {a.target.rpartition(".")[0] for a in attrs}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        if prefix and prefix not in taken:
            container = gm.get_submodule(prefix)
            own = set(container._parameters) | set(container._buffers)
            if not container._modules and type(container) is nn.Module and own == {
                    a.target.rpartition(".")[2] for a in attrs}:
                return prefix
    i = 0
    while f"{fallback}_{i}" in taken or hasattr(gm, f"{fallback}_{i}"):
        i += 1
    return f"{fallback}_{i}"


def _install(gm: fx.GraphModule, node: fx.Node, attrs: list[fx.Node], module: nn.Module,
             x: fx.Node, taken: set[str], fallback: str) -> fx.Node:
    name = _place(gm, attrs, module, taken, fallback)
    taken.add(name)
    for a in attrs:  # drop the raw tensors from their old container
        parent, _, leaf = a.target.rpartition(".")
        owner = gm.get_submodule(parent)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
    gm.add_submodule(name, module)  # replaces the (now empty) container of the same name
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for a in attrs:
        if not a.users:
            gm.graph.erase_node(a)
    return new


_PERMUTE = torch.ops.aten.permute.default


def _linear_view(node: fx.Node, weight: Tensor) -> tuple[fx.Node, fx.Node] | None:
    """``(v, back)`` when the gated call ``node`` is a :class:`GatedLinear` as exported: a 1x1
    layer on ``permute(v, [0, 3, 1, 2])`` (``v``: N x P x 1 x C) whose one user is
    ``back = permute(node, [0, 2, 3, 1])``; else None."""
    if tuple(weight.shape[2:]) != (1, 1):
        return None
    fwd = node.args[0]
    users = list(node.users)
    if not (isinstance(fwd, fx.Node) and fwd.target is _PERMUTE and list(fwd.args[1]) == [0, 3, 1, 2]
            and len(users) == 1 and users[0].target is _PERMUTE
            and list(users[0].args[1]) == [0, 2, 3, 1] and isinstance(fwd.args[0], fx.Node)):
        return None
    return fwd.args[0], users[0]


def modularize(gm: fx.GraphModule, saliency_name: str | None = None) -> fx.GraphModule:
    """Turn ``ispc::gated_conv2d``, ``aten.conv2d`` and ``aten.linear`` calls whose weights are
    attributes into :class:`GatedConv2d`, ``nn.Conv2d`` and ``nn.Linear`` submodules, and
    ``aten.max_pool2d`` calls into the pooling modules ``lower_pools`` uses (in place)."""
    modes = {v: k for k, v in MODE_CODES.items()}
    taken: set[str] = set()
    conv2d, linear = torch.ops.aten.conv2d.default, torch.ops.aten.linear.default
    max_pool = torch.ops.aten.max_pool2d.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (GATED_OP, conv2d, linear, max_pool):
            continue
        a = _bind(node)
        if node.target is max_pool:  # the same fast eager pooling as a compiled model (lower_pools)
            kernel, padding, dilation = (_pair(a[k]) for k in ("kernel_size", "padding", "dilation"))
            stride = _pair(a["stride"]) if a["stride"] else kernel  # [] means "= kernel_size"
            if (isinstance(a["self"], fx.Node) and None not in (kernel, stride, padding, dilation)
                    and isinstance(a["ceil_mode"], bool)):
                pool = fast_max_pool(kernel, stride, padding, dilation, a["ceil_mode"])
                _install(gm, node, [], pool, a["self"], taken, "max_pool")
            continue
        x = a["input"] if "input" in a else a.get("x")
        w_node, b_node = a["weight"], a["bias"]
        w = _attr(gm, w_node)
        b = _attr(gm, b_node) if b_node is not None else None
        if w is None or (b_node is not None and b is None) or not isinstance(x, fx.Node):
            continue
        attrs = [w_node] + ([b_node] if b_node is not None else [])
        if node.target is GATED_OP:
            s_node = a["scale"]
            scale = _attr(gm, s_node)
            if scale is None or a["mode"] not in modes:
                continue
            sal = a["saliency"]
            name = saliency_name if SALIENCY_CODES.get(saliency_name) == sal else next(
                (k for k, v in SALIENCY_CODES.items() if v == sal), None)
            if name is None:
                continue
            view = _linear_view(node, w)
            if view is not None:  # a gated linear layer: it reads v (N x ... x C) itself
                module = GatedLinear(w, b, mode=modes[a["mode"]], threshold=a["threshold"],
                                     k=a["k"], saliency=name, scale=scale)
                v, back = view
                fwd = node.args[0]
                new = _install(gm, node, attrs + [s_node], module, v, taken, "gated_linear")
                back.replace_all_uses_with(new)
                gm.graph.erase_node(back)
                if not fwd.users:
                    gm.graph.erase_node(fwd)
                continue
            module = GatedConv2d(w, b, stride=(a["stride_h"], a["stride_w"]),
                                 padding=(a["pad_h"], a["pad_w"]),
                                 dilation=(a["dil_h"], a["dil_w"]), mode=modes[a["mode"]],
                                 threshold=a["threshold"], k=a["k"], saliency=name, scale=scale)
            _install(gm, node, attrs + [s_node], module, x, taken, "gated_conv")
        elif node.target is conv2d:
            stride, padding = _pair(a["stride"]), _pair(a["padding"])
            dilation = _pair(a["dilation"])
            groups = a["groups"]
            if None in (stride, padding, dilation) or w.dim() != 4 or not isinstance(groups, int):
                continue
            module = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                               padding=padding, dilation=dilation, groups=groups,
                               bias=b is not None, device="meta")
            module.weight = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
            if b is not None:
                module.bias = nn.Parameter(b.detach(), requires_grad=b.requires_grad)
            _install(gm, node, attrs, module, x, taken, "conv")
        else:
            if w.dim() != 2:
                continue
            module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            module.weight = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
            if b is not None:
                module.bias = nn.Parameter(b.detach(), requires_grad=b.requires_grad)
            _install(gm, node, attrs, module, x, taken, "linear")
    _prune_empty(gm)
    gm.recompile()
    return gm


def _prune_empty(root: nn.Module) -> None:
    for name, child in list(root._modules.items()):
        _prune_empty(child)
        if type(child) is nn.Module and not child._modules and not child._parameters \
                and not child._buffers:
            del root._modules[name]
