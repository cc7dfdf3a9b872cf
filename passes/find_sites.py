"""Find gating sites on a channel graph (networkx).

A gating site is the input feature map of a convolution. Gating a convolution's *input* channels
changes that convolution's result only, so any ``groups=1`` convolution can be gated correctly even
when its input also feeds a residual add or a concatenation; those couplings decide whether the
channels could be removed statically (for every consumer at once), which the report shows.

A linear layer over the last dimension of an ``N x ... x C`` input (ConvNeXt's pointwise layers
on ``N x H x W x C`` maps, the MLPs of Swin, MaxViT and ViT on ``N x T x C`` tokens) is a 1x1
convolution in all but name: its site is its input, channel ``c``'s saliency the l2 over the
positions or tokens, and it is a candidate like a convolution when its input's first dimension
is the batch (attention over windows reads ``N * windows`` rows: per-window, not per-instance).

Each node of the FX graph gets a ``channel_kind`` record; every conv2d / linear node a
:class:`~ispc.records.LayerFacts`: its shape facts, dense MACs, and whether it is a candidate for
gating and, if not, why. A convolution or linear layer called as a function (weights computed in
``forward``, or not a module's own: ``passes/lift.py`` lifted the rest) is counted too, named
by the module it ran in.
"""
from __future__ import annotations

import fnmatch
import operator
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ispc.config import GatingConfig
from ispc.modules import LinearConv2d
from ispc.records import LayerFacts

from .base import PassState, module_call_counts, node_shape, records, register_pass
from .lift import module_path

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

_aten = torch.ops.aten
# the same kinds of ops in an exported ATen graph (capture="export")
_ATEN_PASSTHROUGH = {
    _aten.relu.default, _aten.relu_.default, _aten.gelu.default, _aten.silu.default,
    _aten.silu_.default, _aten.sigmoid.default, _aten.hardswish.default, _aten.hardswish_.default,
    _aten.hardsigmoid.default, _aten.tanh.default, _aten.hardtanh.default, _aten.hardtanh_.default,
    _aten.leaky_relu.default, _aten.elu.default, _aten.dropout.default, _aten.clone.default,
    _aten.contiguous.default, _aten._to_copy.default, _aten.to.dtype, _aten.detach.default,
    _aten.alias.default, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default, _aten.pad.default, _aten.constant_pad_nd.default,
    _aten.upsample_nearest2d.vec, _aten.upsample_bilinear2d.vec, _aten.batch_norm.default,
    _aten.mish.default}
_ATEN_BINARY = {_aten.add.Tensor, _aten.add_.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor,
                _aten.sub.Tensor, _aten.div.Tensor}
_ATEN_RESHAPE = {
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.permute.default,
    _aten.transpose.int, _aten.flatten.using_ints, _aten.mean.dim, _aten.sum.dim_IntList,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims, _aten.expand.default,
    _aten.slice.Tensor, _aten.select.int, _aten.split.Tensor, _aten.split_with_sizes.default,
    _aten.chunk.default, _aten.layer_norm.default, _aten.sym_size.int}
_CONV_FUNCS = {F.conv2d, torch.conv2d, _aten.conv2d.default, _aten.conv2d.padding}
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear, _aten.linear.default}


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
        if isinstance(m, nn.BatchNorm2d):
            return "passthrough"
        if isinstance(m, _PASSTHROUGH_MODULES):
            return "passthrough"
        if isinstance(m, (nn.Flatten, nn.LayerNorm)):
            return "reshape"
        return "other"
    if node.op == "call_function":
        if node.target in _CONV_FUNCS:
            return "conv"
        if node.target in _LINEAR_FUNCS:
            return "linear"
        if node.target in (torch.cat, _aten.cat.default):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return "concat" if dim in (1, -3) else "other"
        if node.target in _PASSTHROUGH_FUNCS or node.target in _ATEN_PASSTHROUGH:
            return "passthrough"
        if node.target in _BINARY or node.target in _ATEN_BINARY:
            return "couple" if len(_tensor_args(node)) > 1 else "passthrough"
        if node.target in _RESHAPE_FUNCS or node.target in _ATEN_RESHAPE:
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


def _per_instance(macs: int | None, node: fx.Node, batch: int | None) -> int | None:
    """A layer's MACs per instance: its output's first dimension holds ``rows / batch`` of them per
    instance where it is not the batch (attention over windows: ``N * windows`` rows)."""
    tm = node.meta.get("tensor_meta")
    rows = int(tm.shape[0]) if tm is not None and hasattr(tm, "shape") and len(tm.shape) else None
    if macs is None or batch is None or rows is None or rows == batch or rows % batch:
        return macs
    return macs * (rows // batch)


def _linear_layer(node: fx.Node, m: nn.Linear | None) -> dict[str, Any]:
    if m is not None:
        fin, fout, op = m.in_features, m.out_features, "linear"
    else:  # functional linear: the weight is an argument
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = node_shape(w)
        fout, fin = (shape[0], shape[1]) if shape is not None and len(shape) == 2 else (0, 0)
        op = "linear (functional)"
    tm = node.meta.get("tensor_meta")
    macs = None
    if tm is not None and hasattr(tm, "shape") and fin:
        rows = 1
        for d in tm.shape[1:-1]:
            rows *= int(d)
        macs = int(rows * fin * fout)
    return {"op": op, "in_channels": fin, "out_channels": fout,
            "kernel": None, "stride": None, "groups": 1, "macs": macs}


def _functional_name(node: fx.Node, taken: dict[str, int]) -> str:
    """A functional layer's name: the path of the module it ran in (``nn_module_stack``), made
    unique with the node's name where that module runs several; the node's name at the top."""
    path = module_path(node)
    if path is None:
        return node.name
    return path if taken.get(path, 0) <= 1 else f"{path}:{node.name}"


def _batch_size(state: PassState) -> int | None:
    ex = state.example_inputs
    return int(ex[0].shape[0]) if ex else None


def _linear_reason(name: str, m: nn.Linear, node: fx.Node, calls: int, state: PassState) -> str | None:
    """Why the linear layer at ``node`` is not a candidate (None: it is one), for a linear layer
    over the last dimension of an input of 3 or more dimensions; 2-d inputs are the classifier
    case ``linear_as_conv`` handles."""
    cfg = state.config
    shape = node_shape(node.args[0]) if node.args else None
    if shape is None:
        return ("linear layer; its input shape is unknown (pass calibration data: linear layers "
                "over a map's or a token sequence's channels are gated then)")
    if len(shape) <= 2 and not cfg.gate_linear:
        return ("linear layer (GatingConfig(gate_linear=True) gates linear layers on a "
                "flattened map or a vector)")
    if type(m).forward is not nn.Linear.forward:
        return f"custom linear module {type(m).__name__}"
    if calls > 1:
        return f"module called {calls} times (shared weights)"
    batch = _batch_size(state)
    if len(shape) <= 2:
        if batch is not None and shape[0] != batch:
            return (f"linear layer on {shape[0]} rows for a batch of {batch} (tokens or heads, "
                    "not instances): per-instance gating does not apply")
        return "linear layer on a 2-d input linear_as_conv did not rewrite"
    if batch is not None and shape[0] != batch:
        return (f"its input's first dimension is {shape[0]} rows for a batch of {batch} (windows "
                "or heads, not instances): per-instance gating does not apply")
    return _config_reason(name, m.in_features, cfg)


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
    return _config_reason(name, m.in_channels, cfg)


def _config_reason(name: str, in_channels: int, cfg: GatingConfig) -> str | None:
    """Why the user's config leaves a layer that could be gated dense (None: it does not)."""
    if in_channels < cfg.min_channels:
        return f"too few input channels ({in_channels} < min_channels={cfg.min_channels})"
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
    functional = [n for n in gm.graph.nodes if n.op == "call_function"
                  and (n.target in _CONV_FUNCS or n.target in _LINEAR_FUNCS)]
    per_path: dict[str, int] = {}
    for n in functional:
        if (p := module_path(n)) is not None:
            per_path[p] = per_path.get(p, 0) + 1
    for node in gm.graph.nodes:
        is_conv_module = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)
        is_conv_func = node.op == "call_function" and node.target in _CONV_FUNCS
        if node.op == "call_function" and node.target in _LINEAR_FUNCS:
            facts = _linear_layer(node, None)
            facts["macs"] = _per_instance(facts["macs"], node, _batch_size(state))
            records(node).layer = LayerFacts(
                **facts, name=_functional_name(node, per_path),
                reason="functional linear (weights not held by an nn.Linear)")
            continue
        if is_conv_module or is_conv_func:
            m = gm.get_submodule(node.target) if is_conv_module else None
            name = node.target if is_conv_module else _functional_name(node, per_path)
            layer = _conv_layer(gm, node, m)
            layer["macs"] = _per_instance(layer["macs"], node, _batch_size(state))
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
            reason = _linear_reason(node.target, m, node, calls.get(node.target, 1), state)
            site = site_node = None
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if reason is None and src is not None:
                site_node = src.name
                shared = [u for u in g.successors(src.name) if u != node.name]
                site = f"input shared with {len(shared)} other consumer(s)" if shared else None
            facts = _linear_layer(node, m)
            facts["macs"] = _per_instance(facts["macs"], node, _batch_size(state))
            records(node).layer = LayerFacts(**facts, name=node.target,
                                             reason=reason, site=site, site_node=site_node)
    return gm
