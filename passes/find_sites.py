"""Find gating sites on a channel graph (networkx).

A gating site is the input feature map of a convolution. Gating a convolution's *input* channels
changes that convolution's result only, so any ``groups=1`` convolution can be gated correctly even
when its input also feeds a residual add or a concatenation; those couplings decide whether the
channels could be removed statically (for every consumer at once), which the report shows.

Each node of the FX graph gets a ``channel_kind`` record; every conv2d / linear node a
:class:`~ispc.records.LayerFacts`: its shape facts, dense MACs, and whether it is a candidate for
gating and, if not, why.
"""
from __future__ import annotations

import fnmatch
import operator
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ispc.modules import LinearConv2d
from ispc.records import LayerFacts

from .base import PassState, module_call_counts, records, register_pass

__all__ = ["find_sites", "channel_kind", "build_channel_graph", "coupling_groups"]

_PASSTHROUGH_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
    nn.ZeroPad2d, nn.ConstantPad2d,
)
_PASSTHROUGH_FUNCS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.sigmoid, torch.sigmoid, torch.relu, torch.tanh,
    F.leaky_relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.interpolate,
    F.hardsigmoid, F.elu, F.pad, torch.nn.functional.batch_norm,
}
_PASSTHROUGH_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach",
                        "clamp", "clamp_min", "relu_", "sigmoid_"}
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, torch.add, torch.mul,
           torch.sub, operator.truediv, torch.div}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "chunk", "split", "mean",
                    "sum", "size", "unsqueeze", "squeeze", "expand", "expand_as", "view_as"}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.chunk,
                  torch.split, operator.getitem, torch.mean, torch.sum}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def channel_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a node treats the channel axis: ``input``, ``conv``, ``depthwise``, ``grouped``,
    ``linear``, ``passthrough`` (same channels in and out), ``couple`` (elementwise on two feature
    maps: residual add, gating multiply), ``concat``, ``reshape`` (channel identity lost),
    ``output``, ``param`` or ``other``."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "param"
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                return "conv"
            return "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, _PASSTHROUGH_MODULES):
            return "passthrough"
        if isinstance(m, (nn.Flatten, nn.LayerNorm)):
            return "reshape"
        return "other"
    if node.op == "call_function":
        if node.target is F.conv2d:
            return "conv"
        if node.target is F.linear:
            return "linear"
        if node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return "concat" if dim in (1, -3) else "other"
        if node.target in _PASSTHROUGH_FUNCS:
            return "passthrough"
        if node.target in _BINARY:
            return "couple" if len(_tensor_args(node)) > 1 else "passthrough"
        if node.target in _RESHAPE_FUNCS:
            return "reshape"
        return "other"
    if node.op == "call_method":
        if node.target in _PASSTHROUGH_METHODS:
            return "passthrough"
        if node.target in _BINARY_METHODS:
            return "couple" if len(_tensor_args(node)) > 1 else "passthrough"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
    return "other"


def build_channel_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Directed graph of data flow between FX nodes, each annotated with its channel kind."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        kind = records(node).channel_kind or channel_kind(gm, node)
        g.add_node(node.name, kind=kind, target=str(node.target), op=node.op)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def coupling_groups(g: nx.DiGraph) -> list[set[str]]:
    """Sets of nodes whose channel index spaces are tied together.

    A conv or linear starts a new space; passthrough ops, depthwise/grouped convs and elementwise
    couples (residual adds) keep or tie spaces. Statically removing a channel means removing it
    from every producer and consumer in its group; gating a conv's input needs no such agreement.
    """
    u = nx.Graph()
    u.add_nodes_from(g.nodes)
    for src, dst in g.edges:
        kind = g.nodes[dst]["kind"]
        if kind in ("passthrough", "couple", "depthwise", "grouped") and g.nodes[src]["kind"] != "param":
            u.add_edge(src, dst)
    return [set(c) for c in nx.connected_components(u)]


def _conv_layer(gm: fx.GraphModule, node: fx.Node, m: nn.Conv2d | None) -> dict[str, Any]:
    if m is not None:
        w_shape = tuple(m.weight.shape)
        info = {"op": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "groups": m.groups}
    else:  # functional conv2d: weight is an argument
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        wm = w.meta.get("tensor_meta") if isinstance(w, fx.Node) else None
        w_shape = tuple(wm.shape) if wm is not None else None
        groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
        stride = node.kwargs.get("stride", node.args[3] if len(node.args) > 3 else 1)
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
        info = {"op": "conv2d (functional)", "in_channels": (w_shape[1] * groups) if w_shape else 0,
                "out_channels": w_shape[0] if w_shape else 0,
                "kernel": tuple(w_shape[2:]) if w_shape else None, "stride": stride, "groups": groups}
    tm = node.meta.get("tensor_meta")
    macs = None
    if tm is not None and w_shape is not None and hasattr(tm, "shape"):
        n, cout, ho, wo = tm.shape
        macs = int(cout * ho * wo * w_shape[1] * w_shape[2] * w_shape[3])
    info["macs"] = macs
    return info


def _linear_layer(node: fx.Node, m: nn.Linear) -> dict[str, Any]:
    tm = node.meta.get("tensor_meta")
    macs = None
    if tm is not None and hasattr(tm, "shape"):
        rows = 1
        for d in tm.shape[1:-1]:
            rows *= int(d)
        macs = int(rows * m.in_features * m.out_features)
    return {"op": "linear", "in_channels": m.in_features, "out_channels": m.out_features,
            "kernel": None, "stride": None, "groups": 1, "macs": macs}


def _ineligible_reason(name: str, m: nn.Conv2d | None, calls: int, state: PassState) -> str | None:
    cfg = state.config
    if m is None:
        return "functional conv2d (weights not held by an nn.Conv2d)"
    if type(m) not in (nn.Conv2d, LinearConv2d):
        return f"custom conv module {type(m).__name__}"
    if m.groups > 1:
        if m.groups == m.in_channels:
            return "depthwise conv"
        return f"grouped conv (groups={m.groups})"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only zero padding is gated)"
    if isinstance(m.padding, str) and m.padding != "valid":
        k_even = any((d * (k - 1)) % 2 for k, d in zip(m.kernel_size, m.dilation))
        if k_even:
            return "asymmetric padding='same'"
    if calls > 1:
        return f"module called {calls} times (shared weights)"
    if m.in_channels < cfg.min_channels:
        return f"too few input channels ({m.in_channels} < min_channels={cfg.min_channels})"
    if cfg.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return "not matched by config.include"
    if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
        return "excluded by config.exclude"
    return None


@register_pass("find_sites")
def find_sites(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Annotate channel kinds and candidate layers; build the channel graph."""
    calls = module_call_counts(gm)
    for node in gm.graph.nodes:
        records(node).channel_kind = channel_kind(gm, node)
    g = build_channel_graph(gm)
    groups = coupling_groups(g)
    group_of = {n: i for i, grp in enumerate(groups) for n in grp}
    state.channel_graph = g
    for node in gm.graph.nodes:
        is_conv_module = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)
        is_conv_func = node.op == "call_function" and node.target is F.conv2d
        if is_conv_module or is_conv_func:
            m = gm.get_submodule(node.target) if is_conv_module else None
            name = node.target if is_conv_module else node.name
            layer = _conv_layer(gm, node, m)
            if isinstance(m, LinearConv2d):  # passes/linear_as_conv.py
                layer["op"] = "linear"
            site = site_node = None
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if src is not None:
                grp = groups[group_of[src.name]]
                kinds = {g.nodes[n]["kind"] for n in grp}
                shared = [g.nodes[u]["kind"] for u in g.successors(src.name) if u != node.name]
                notes = []
                if "couple" in kinds:
                    notes.append("channels tied by a residual add/multiply")
                if "concat" in {g.nodes[u]["kind"] for u in g.successors(src.name)}:
                    notes.append("input also concatenated")
                if src.op == "placeholder":
                    notes.append("network input")
                elif shared:
                    notes.append(f"input shared with {len(shared)} other consumer(s)")
                site, site_node = "; ".join(notes) or None, src.name
            records(node).layer = LayerFacts(
                **layer, name=name, reason=_ineligible_reason(name, m, calls.get(node.target, 1), state),
                site=site, site_node=site_node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            m = gm.get_submodule(node.target)
            reason = ("linear layer (GatingConfig(gate_linear=True) gates linear layers on a "
                      "flattened map or a vector)" if not state.config.gate_linear else
                      "linear layer not on a 2-d input of known shape, or called more than once")
            records(node).layer = LayerFacts(**_linear_layer(node, m), name=node.target, reason=reason)
    return gm
