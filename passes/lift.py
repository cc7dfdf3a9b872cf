"""Lift: layers a graph holds as function calls become calls of modules at the user's paths.

Every later pass reads a module-level graph: a gated layer is a ``call_module`` node whose target
is the layer's qualified name (``layer1.0.conv1``), the name the report, the archive and
:class:`ispc.GateMasks` use. ``torch.fx`` gives that graph for plain models; this pass gives it
for the rest, in one place:

- an ATen graph from ``torch.export`` (``capture="export"``, an ``ExportedProgram`` or its
  ``.module()``): ``aten.conv2d``, ``aten.linear``, ``aten.batch_norm`` and ``aten.layer_norm``
  whose weights are a module's parameters become ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``
  and ``nn.LayerNorm`` calls named by that module's path (the parameters' full names, which
  ``torch.export`` keeps); activations, pools and dropout that a ``torch.nn`` module applied
  (its type in the node's ``nn_module_stack``) become calls of that module type at its path, as
  ``torch.fx`` would have left them; eval-mode dropout disappears;
- a ``torch.fx`` graph: ``F.conv2d``/``F.linear`` calls on a module's own parameters (a
  subclassed convolution's ``forward`` traced through, timm's classifiers calling ``F.linear``)
  become calls of a plain ``nn.Conv2d``/``nn.Linear`` at that module's path.

Exact: each lifted module computes what the call did, on the same parameter tensors (shared,
not copied). A call whose weight is computed in ``forward`` (weight standardization) or not a
module's own parameter stays a function call; ``find_sites`` names it by the module it ran in.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from .base import PassState, register_pass, replace_submodule

__all__ = ["lift", "lift_modules", "module_path", "module_type_name"]

_aten = torch.ops.aten

#: python signatures of the functions torch.fx leaves in graphs (builtins: no inspect.signature)
_F_PARAMS: dict[Callable, tuple[tuple[str, Any], ...]] = {
    F.conv2d: (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
               ("dilation", 1), ("groups", 1)),
    torch.conv2d: (("input", None), ("weight", None), ("bias", None), ("stride", 1),
                   ("padding", 0), ("dilation", 1), ("groups", 1)),
    F.linear: (("input", None), ("weight", None), ("bias", None)),
    torch._C._nn.linear: (("input", None), ("weight", None), ("bias", None)),
}
_CONV = {_aten.conv2d.default, _aten.conv2d.padding, F.conv2d, torch.conv2d}
_LINEAR = {_aten.linear.default, F.linear, torch._C._nn.linear}
_BATCH_NORM = {_aten.batch_norm.default}
_LAYER_NORM = {_aten.layer_norm.default}
_DROPOUT = {_aten.dropout.default, _aten.dropout_.default, _aten.feature_dropout.default,
            _aten.feature_dropout_.default}


def _bind(node: fx.Node) -> dict[str, Any] | None:
    """The node's arguments by parameter name, defaults filled in (None: cannot bind)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        try:
            pair = normalize_function(target, node.args, node.kwargs,
                                      normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 -- an unusual call: leave it alone
            return None
        if pair is None:
            return None
        bound = dict(pair.kwargs)
        for arg in target._schema.arguments:
            if arg.name not in bound and arg.has_default_value():
                bound[arg.name] = arg.default_value
        return bound
    params = _F_PARAMS.get(target)
    if params is None or len(node.args) > len(params):
        return None
    names = [p for p, _ in params]
    bound = dict(params)
    bound.update(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in bound:
            return None
        bound[k] = v
    return bound


def module_path(node: fx.Node) -> str | None:
    """The path of the innermost module whose forward produced ``node`` (``nn_module_stack``,
    which both torch.fx and torch.export record), or None (the model's own forward)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def module_type_name(node: fx.Node) -> str | None:
    """The qualified class name of that innermost module (export records it as a string, fx as
    the class)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    kind = list(stack.values())[-1][1]
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(
            isinstance(a, int) and not isinstance(a, bool) for a in v):
        return (int(v[0]), int(v[-1]))
    return None


def _owner(gm: fx.GraphModule, nodes: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The module path ``P`` whose ``P.<name>`` parameters/buffers the get_attr nodes ``nodes``
    (name -> node or None) are, when they all belong to one non-root module; else None."""
    prefix = None
    for name in names:
        a = nodes.get(name)
        if a is None:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            return None
        p, _, leaf = a.target.rpartition(".")
        if leaf != name or not p or (prefix is not None and p != prefix):
            return None
        prefix = p
    return prefix


def _attr(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    owner, _, leaf = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner), leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _conv(gm: fx.GraphModule, a: dict[str, Any]) -> nn.Module | None:
    w, b = _attr(gm, a["weight"]), _attr(gm, a["bias"])
    stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"]), a["groups"]
    padding = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"])
    if (w is None or w.dim() != 4 or None in (stride, padding, dilation)
            or not isinstance(groups, int) or (a["bias"] is not None and b is None)):
        return None
    if padding == "same" and stride != (1, 1):
        return None
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, bias=b is not None,
                     device="meta")
    conv.weight = _param(w)
    if b is not None:
        conv.bias = _param(b)
    return conv


def _linear(gm: fx.GraphModule, a: dict[str, Any]) -> nn.Module | None:
    w, b = _attr(gm, a["weight"]), _attr(gm, a["bias"])
    if w is None or w.dim() != 2 or (a["bias"] is not None and b is None):
        return None
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = _param(w)
    if b is not None:
        lin.bias = _param(b)
    return lin


def _batch_norm(gm: fx.GraphModule, a: dict[str, Any]) -> nn.Module | None:
    w, b = _attr(gm, a["weight"]), _attr(gm, a["bias"])
    mean, var = _attr(gm, a["running_mean"]), _attr(gm, a["running_var"])
    if a["training"] is not False or None in (w, b, mean, var) or w.dim() != 1:
        return None
    bn = nn.BatchNorm2d(w.shape[0], eps=float(a["eps"]), momentum=a["momentum"], device="meta")
    bn.weight, bn.bias = _param(w), _param(b)
    bn.running_mean, bn.running_var = mean, var
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long)
    return bn.eval()


def _layer_norm(gm: fx.GraphModule, a: dict[str, Any]) -> nn.Module | None:
    w, b = _attr(gm, a["weight"]), _attr(gm, a["bias"])
    shape = a["normalized_shape"]
    if w is None or b is None or not isinstance(shape, (list, tuple)) or tuple(w.shape) != tuple(shape):
        return None
    ln = nn.LayerNorm(tuple(shape), eps=float(a["eps"]), device="meta")
    ln.weight, ln.bias = _param(w), _param(b)
    return ln


#: parametric layers: targets -> (its tensors' names in the call, owned as ``P.<name>``, the
#: name of the tensor argument it reads, builder)
_PARAMETRIC: list[tuple[set, tuple[str, ...], str, Callable]] = [
    (_CONV, ("weight", "bias"), "input", _conv),
    (_LINEAR, ("weight", "bias"), "input", _linear),
    (_BATCH_NORM, ("weight", "bias", "running_mean", "running_var"), "input", _batch_norm),
    (_LAYER_NORM, ("weight", "bias"), "input", _layer_norm),
]


_KIND = {_conv: "conv2d", _linear: "linear", _batch_norm: "norm", _layer_norm: "norm"}


def _act(cls: type[nn.Module], **fixed: Any) -> Callable[[dict[str, Any]], nn.Module | None]:
    return lambda a: cls(**fixed)


def _hardtanh(inplace: bool) -> Callable[[dict[str, Any]], nn.Module | None]:
    def build(a: dict[str, Any]) -> nn.Module | None:
        return nn.ReLU6(inplace=inplace) if (a["min_val"], a["max_val"]) == (0.0, 6.0) else None
    return build


def _max_pool(a: dict[str, Any]) -> nn.Module | None:
    k, p, d = _pair(a["kernel_size"]), _pair(a["padding"]), _pair(a["dilation"])
    s = _pair(a["stride"]) if a["stride"] else k
    if None in (k, s, p, d):
        return None
    return nn.MaxPool2d(k, s, p, d, ceil_mode=bool(a["ceil_mode"]))


def _avg_pool(a: dict[str, Any]) -> nn.Module | None:
    k, p = _pair(a["kernel_size"]), _pair(a["padding"])
    s = _pair(a["stride"]) if a["stride"] else k
    if None in (k, s, p):
        return None
    return nn.AvgPool2d(k, s, p, ceil_mode=bool(a["ceil_mode"]),
                        count_include_pad=bool(a["count_include_pad"]),
                        divisor_override=a["divisor_override"])


def _adaptive_avg(a: dict[str, Any]) -> nn.Module | None:
    size = a["output_size"]
    return nn.AdaptiveAvgPool2d(tuple(size) if isinstance(size, (list, tuple)) else size)


#: parameter-free ATen calls a ``torch.nn`` module made -> (that module's class, builder)
_FREE: dict[Any, tuple[type[nn.Module], Callable[[dict[str, Any]], nn.Module | None]]] = {
    _aten.relu.default: (nn.ReLU, _act(nn.ReLU)),
    _aten.relu_.default: (nn.ReLU, _act(nn.ReLU, inplace=True)),
    _aten.hardtanh.default: (nn.ReLU6, _hardtanh(False)),
    _aten.hardtanh_.default: (nn.ReLU6, _hardtanh(True)),
    _aten.gelu.default: (nn.GELU, lambda a: nn.GELU(approximate=a["approximate"])),
    _aten.silu.default: (nn.SiLU, _act(nn.SiLU)),
    _aten.silu_.default: (nn.SiLU, _act(nn.SiLU, inplace=True)),
    _aten.sigmoid.default: (nn.Sigmoid, _act(nn.Sigmoid)),
    _aten.hardswish.default: (nn.Hardswish, _act(nn.Hardswish)),
    _aten.hardswish_.default: (nn.Hardswish, _act(nn.Hardswish, inplace=True)),
    _aten.hardsigmoid.default: (nn.Hardsigmoid, _act(nn.Hardsigmoid)),
    _aten.tanh.default: (nn.Tanh, _act(nn.Tanh)),
    _aten.max_pool2d.default: (nn.MaxPool2d, _max_pool),
    _aten.avg_pool2d.default: (nn.AvgPool2d, _avg_pool),
    _aten.adaptive_avg_pool2d.default: (nn.AdaptiveAvgPool2d, _adaptive_avg),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _free_tensors_ok(gm: fx.GraphModule, path: str, owned: set[str]) -> bool:
    """Whether the container at ``path`` holds nothing but ``owned`` tensors and no submodule
    (then a module can take its place without hiding anything else the graph reads)."""
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return False
    if isinstance(mod, fx.GraphModule) or mod._modules:
        return False
    return set(mod._parameters) | set(mod._buffers) <= owned | {"num_batches_tracked"}


def _replace(gm: fx.GraphModule, node: fx.Node, target: str, x: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (x,))
    new.meta.update({k: v for k, v in node.meta.items() if k != "ispc"})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _batch_norm_getitem(node: fx.Node) -> fx.Node | None:
    """``aten._native_batch_norm_legit_no_training(...)[0]`` (older exports): the getitem."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def lift_modules(gm: fx.GraphModule, *, aten: bool) -> dict[str, int]:
    """Lift the function calls described in the module docstring (``aten``: the graph is an
    exported ATen graph, whose parameter-free module calls are lifted too). In place; returns
    how many calls of each kind were lifted."""
    graph = gm.graph
    counts = {"conv2d": 0, "linear": 0, "norm": 0, "activation": 0, "dropout": 0}
    # every call of one parameter owner must agree (shared weights: one module, several calls)
    claimed: dict[str, nn.Module] = {}
    # a module the graph already calls (a leaf) is never replaced, even if its weights are also
    # read by a function call elsewhere
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if aten and node.target in _DROPOUT:
            a = _bind(node)
            if a is not None and a.get("train") is False and isinstance(a["input"], fx.Node):
                node.replace_all_uses_with(a["input"])
                graph.erase_node(node)
                counts["dropout"] += 1
            continue
        for targets, names, xname, build in _PARAMETRIC:
            if node.target not in targets:
                continue
            a = _bind(node)
            if a is None or not isinstance(a.get(xname), fx.Node):
                break
            owner = _owner(gm, a, names)
            if owner is None or owner in called or not _free_tensors_ok(gm, owner, set(names)):
                break
            module = build(gm, a)
            if module is None:
                break
            prev = claimed.get(owner)
            if prev is not None and repr(prev) != repr(module):
                break  # the same weights in two different calls: leave them as functions
            if prev is None:
                replace_submodule(gm, owner, module)
                claimed[owner] = module
            _replace(gm, node, owner, a[xname])
            counts[_KIND[build]] += 1
            break
        else:
            if not aten or node.target not in _FREE:
                continue
            cls, build = _FREE[node.target]
            path, kind = module_path(node), module_type_name(node)
            a = _bind(node)
            if path is None or kind != _qualname(cls) or a is None or not isinstance(
                    a.get("self", a.get("input")), fx.Node):
                continue
            module = build(a)
            if module is None:
                continue
            prev = claimed.get(path)
            if path in called:
                continue
            if prev is None:
                if not _free_tensors_ok(gm, path, set()) and _exists(gm, path):
                    continue
                replace_submodule(gm, path, module)
                claimed[path] = module
            elif repr(prev) != repr(module):
                continue
            _replace(gm, node, path, a.get("self", a.get("input")))
            counts["activation"] += 1
    if any(counts.values()):
        for node in list(graph.nodes):  # the lifted calls' parameters, now read by modules
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
    return counts


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


@register_pass("lift")
def lift(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Lift layers held as function calls to module calls (see the module docstring)."""
    aten = bool(state.capture) and state.capture != "fx"
    counts = lift_modules(gm, aten=aten)
    layers = counts["conv2d"] + counts["linear"]
    if layers and not aten:
        state.notes.append(f"lift: {layers} convolution/linear call(s) on a module's own weights "
                           "(a subclass's forward, F.linear) named by that module's path")
    return gm
