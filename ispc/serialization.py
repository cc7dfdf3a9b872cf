"""Save and load compiled models without unpickling arbitrary objects.

Format (one zip file, ``.ispc`` by convention):

- ``manifest.json``: format version, the backend, ``GatingConfig.to_dict()``, ``Report.to_dict()``
  and the *program*: the graph of :func:`ispc.export.export_program` (ATen operators plus one
  ``ispc::gated_conv2d`` per gated layer, dynamic batch) written node by node as JSON. Operator
  targets are stored by name (``"aten::conv2d.default"``) and resolved on load only through the
  operator registry (``torch.ops.<namespace>.<name>.<overload>``) or a fixed allow-list of
  ``operator``/``math``/``torch.sym_*`` functions; argument values are JSON scalars, lists, dtypes,
  devices, layouts and memory formats. Nothing in the manifest can name an arbitrary Python object.
  It also records each gated layer's eager CPU kernel (``GatedConv2d.strategy``).
- ``weights.pt``: the parameters, buffers and tensor constants the graph reads (derived tensors
  such as a kernel's prepared ``W^T`` are rebuilt on load), a dict of tensors written with
  :func:`torch.save` and read back with ``torch.load(weights_only=True)`` (PyTorch's restricted
  unpickler: tensors and plain containers only).

Why not ``torch.export.save``/``torch.export.load`` (a ``.pt2`` archive)? Its loader falls back to
``torch.load(weights_only=False)`` for the stored example inputs and unpickles tensor-subclass
weights and script objects, so a crafted ``.pt2`` file can run code; this format cannot.

What the loaded model is: a :class:`~ispc.compiled.CompiledModel` whose ``graph_module`` is a
:class:`torch.fx.GraphModule` over ATen operators in which every gated layer is again a
:class:`~ispc.modules.GatedConv2d` submodule (under its original qualified name when that can be
recovered from the weight names, with its kernel strategy re-selected) and every plain
``aten.conv2d``/``aten.linear`` with stored weights is an ``nn.Conv2d``/``nn.Linear`` submodule,
and every ``aten.max_pool2d`` the fast pooling module a compiled model uses (``lower_pools``).
So ``gated_modules()``, ``measure()`` (its MAC counts see the same layers as before saving),
``kept_mask``, ``reference`` and ``set_strategy`` work after loading, as do ``.report`` and
``.config``. Other layers (ReLU, average pooling, add, ...) are ATen calls, not modules, so graph passes
that match ``nn.Module`` types or the original Python functions will not recognize them, and
the loaded graph cannot be re-compiled from scratch by ``ispc.compile`` (compile the original).
Outputs keep the eager model's structure (tensor, tuple, dict).
The graph accepts any batch size; other dimensions are those of the example input used when saving
(by default the calibration input size recorded in the report). ``GatingConfig.leaf_modules``
(classes) are not restored: a class cannot be re-imported from its name without trusting the file;
the loaded config has ``leaf_modules=()`` and the report notes the dropped names.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import operator
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .backends import BACKENDS
from .compiled import CompiledModel
from .config import GatingConfig
from .errors import IspcError, UnsupportedModelError
from .export import GATED_OP, as_example_inputs, eval_mode, export_program
from .modules import MODE_CODES, ORIENTATIONS, SALIENCY_CODES, GatedConv2d, fast_max_pool
from .ops import native
from .ops.cpu_kernels import STRATEGIES
from .passes import apply_kernel, records
from .passes.channels_last import insert_converters, runs_channels_last
from .pipeline import reload
from .records import KernelChoice
from .report import Report

__all__ = ["save", "load", "ArchiveError", "FORMAT", "FORMAT_VERSION", "program_to_json",
           "program_from_json", "modularize"]

FORMAT = "ispc.compiled"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "weights.pt"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class ArchiveError(IspcError, ValueError):
    """A file that is not an ispc archive, is damaged, or names something ispc will not load."""


# --- targets ------------------------------------------------------------------------------------

def _python_functions() -> dict[str, Callable]:
    """The only non-operator callables a stored graph may name (symbolic-shape arithmetic)."""
    fns: dict[str, Callable] = {}
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq",
                 "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs"):
        fns[f"operator.{name}"] = getattr(operator, name)
    for name in ("ceil", "floor", "sqrt", "trunc"):
        fns[f"math.{name}"] = getattr(math, name)
    for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt"):
        if hasattr(torch, name):
            fns[f"torch.{name}"] = getattr(torch, name)
    return fns


_PY_FNS = _python_functions()
_PY_NAMES = {id(f): n for n, f in _PY_FNS.items()}


def _target_to_json(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    name = _PY_NAMES.get(id(target))
    if name is not None:
        return "py:" + name
    raise UnsupportedModelError(
        f"cannot save a graph that calls {target!r}: ispc archives store only registered operators "
        "(torch.ops.*) and shape arithmetic; higher-order operators (cond, while_loop, ...) and "
        "Python callables are not supported")


def _target_from_json(name: Any) -> Callable:
    if not isinstance(name, str):
        raise ArchiveError(f"bad operator name {name!r}")
    if name.startswith("py:"):
        fn = _PY_FNS.get(name[3:])
        if fn is None:
            raise ArchiveError(f"the archive calls {name[3:]!r}, which is not on ispc's allow-list")
        return fn
    qual, _, overload = name.rpartition(".")
    ns, sep, op = qual.partition("::")
    if not sep or not all(_IDENT.match(p) and not p.startswith("__") for p in (ns, op, overload)):
        raise ArchiveError(f"bad operator name {name!r}")
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        target = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        raise ArchiveError(f"the archive calls operator {name!r}, which is not registered in this "
                           "process; import the library that defines it before ispc.load") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise ArchiveError(f"{name!r} does not name an operator overload")
    return target


# --- argument values ----------------------------------------------------------------------------

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values()
           if isinstance(v, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
            if isinstance(v, torch.layout)}
_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
            if isinstance(v, torch.memory_format)}


def _arg_to_json(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, list):
        return [_arg_to_json(v) for v in a]
    if isinstance(a, tuple):
        return {"tuple": [_arg_to_json(v) for v in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise UnsupportedModelError(f"cannot save a graph argument of type {type(a).__name__} ({a!r})")


def _arg_from_json(a: Any, env: dict[str, fx.Node]) -> Any:
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [_arg_from_json(v, env) for v in a]
    if isinstance(a, dict) and len(a) == 1:
        (kind, v), = a.items()
        try:
            if kind == "node":
                return env[v]
            if kind == "tuple":
                return tuple(_arg_from_json(x, env) for x in v)
            if kind == "float" and v in ("inf", "-inf", "nan"):
                return float(v)
            if kind == "dtype":
                return _DTYPES[v]
            if kind == "device":
                return torch.device(v)
            if kind == "layout":
                return _LAYOUTS[v]
            if kind == "memory_format":
                return _FORMATS[v]
        except (KeyError, TypeError, RuntimeError):
            pass
    raise ArchiveError(f"bad argument value in the archive: {a!r}")


# --- program <-> JSON ---------------------------------------------------------------------------

_KINDS = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
          InputKind.CONSTANT_TENSOR: "constant", InputKind.USER_INPUT: "user_input"}


def program_to_json(ep: ExportedProgram, forward_arg_names: list[str] | None = None,
                    out_spec: Any = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Describe an exported program as JSON plus a flat dict of the tensors it uses.

    ``out_spec``: the output structure to record instead of the program's own (exporting an
    fx.GraphModule reports fx's immutable containers where the eager model returns dict/list).
    """
    sig = ep.graph_signature
    bad = [s.kind.name for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad:
        raise UnsupportedModelError(f"the exported program mutates state ({bad}); ispc saves "
                                    "inference graphs only (call .eval() on the model)")
    tensors: dict[str, Tensor] = {}
    inputs = []
    specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    nodes, output = [], None
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs.get(node.name)
            if spec is None or spec.kind not in _KINDS:
                kind = spec.kind.name if spec is not None else "unknown"
                raise UnsupportedModelError(f"cannot save graph input {node.name!r} of kind {kind}")
            entry = {"name": node.name, "kind": _KINDS[spec.kind]}
            if spec.kind != InputKind.USER_INPUT and not node.users:
                continue  # a tensor the graph never reads (e.g. a kernel's cached W^T): derived
            if spec.kind != InputKind.USER_INPUT:
                value = ep.state_dict.get(spec.target)
                if value is None:
                    value = ep.constants.get(spec.target)
                if not isinstance(value, Tensor):
                    raise UnsupportedModelError(f"graph input {spec.target!r} is not a tensor")
                if type(value) not in (Tensor, nn.Parameter):
                    raise UnsupportedModelError(f"{spec.target!r} is a tensor subclass "
                                                f"({type(value).__name__}); only plain tensors "
                                                "are saved")
                entry["target"] = spec.target
                entry["requires_grad"] = bool(value.requires_grad)
                tensors[spec.target] = value.detach()
            inputs.append(entry)
        elif node.op == "call_function":
            nodes.append({"name": node.name, "target": _target_to_json(node.target),
                          "args": [_arg_to_json(a) for a in node.args],
                          "kwargs": {k: _arg_to_json(v) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            output = _arg_to_json(node.args[0])
        else:
            raise UnsupportedModelError(f"cannot save graph node {node.name!r} ({node.op})")
    call_spec = ep.call_spec
    try:
        in_spec = pytree.treespec_dumps(call_spec.in_spec)
        spec = call_spec.out_spec
        if out_spec is not None and out_spec.num_leaves == spec.num_leaves:
            spec = out_spec
        out_spec = pytree.treespec_dumps(spec)
    except Exception as exc:  # unregistered container types in the signature
        raise UnsupportedModelError(f"cannot save the model's input/output structure: "
                                    f"{exc}") from None
    program = {"inputs": inputs, "nodes": nodes, "output": output, "in_spec": in_spec,
               "out_spec": out_spec, "forward_arg_names": list(forward_arg_names or [])}
    return program, tensors


def _set_tensor(root: nn.Module, fqn: str, value: Tensor, kind: str, requires_grad: bool) -> None:
    if not _FQN.match(fqn):
        raise ArchiveError(f"bad tensor name {fqn!r} in the archive")
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    if kind == "parameter":
        mod.register_parameter(leaf, nn.Parameter(value, requires_grad=requires_grad))
    else:
        mod.register_buffer(leaf, value, persistent=kind == "buffer")


def _child(spec: Any, i: int) -> Any:
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]


def _codegen(program: dict[str, Any], n_user: int):
    try:
        in_spec = pytree.treespec_loads(program["in_spec"])
        out_spec = pytree.treespec_loads(program["out_spec"])
    except Exception as exc:
        raise ArchiveError(f"bad input/output structure in the archive: {exc}") from None
    names = [n for n in program.get("forward_arg_names", [])
             if isinstance(n, str) and _IDENT.match(n)]
    if in_spec.type is tuple and in_spec.num_children == 2 and _child(in_spec, 1).type is dict:
        n_args = _child(in_spec, 0).num_children
        kw = list(_child(in_spec, 1).context)
        if len(names) != n_args:
            names = [f"arg_{i}" for i in range(n_args)]
        names = names + [k for k in kw if isinstance(k, str) and _IDENT.match(k)]
    else:
        names = [f"arg_{i}" for i in range(in_spec.num_children)]
    if in_spec.num_leaves != n_user:
        raise ArchiveError("the archive's input structure does not match its graph inputs")
    return _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))


def program_from_json(program: dict[str, Any], tensors: dict[str, Tensor]) -> fx.GraphModule:
    """Rebuild a runnable :class:`torch.fx.GraphModule` (ATen calls, weights as attributes)."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    n_user = 0
    try:
        for entry in program["inputs"]:
            name, kind = entry["name"], entry["kind"]
            if not isinstance(name, str) or not _IDENT.match(name):
                raise ArchiveError(f"bad node name {name!r}")
            if kind == "user_input":
                env[name] = graph.placeholder(name)
                n_user += 1
                continue
            if kind not in ("parameter", "buffer", "constant"):
                raise ArchiveError(f"bad input kind {kind!r}")
            target = entry["target"]
            if target not in tensors:
                raise ArchiveError(f"the archive has no weights for {target!r}")
            _set_tensor(root, target, tensors[target], kind, bool(entry.get("requires_grad")))
            env[name] = graph.get_attr(target)
        for spec in program["nodes"]:
            name = spec["name"]
            if not isinstance(name, str) or not _IDENT.match(name) or name in env:
                raise ArchiveError(f"bad node name {name!r}")
            args = tuple(_arg_from_json(a, env) for a in spec["args"])
            kwargs = {str(k): _arg_from_json(v, env) for k, v in spec["kwargs"].items()}
            env[name] = graph.create_node("call_function", _target_from_json(spec["target"]),
                                          args, kwargs, name=name)
        out = _arg_from_json(program["output"], env)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArchiveError(f"damaged program description in the archive ({type(exc).__name__}: "
                           f"{exc})") from None
    graph.output(out)
    graph._codegen = _codegen(program, n_user)
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


# --- turning ATen calls back into modules -------------------------------------------------------

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
             x: fx.Node, taken: set[str], fallback: str) -> None:
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


# --- public API ---------------------------------------------------------------------------------

def _default_example(compiled: CompiledModel) -> tuple[Tensor, ...]:
    shape = compiled.report.summary.get("input_shape")
    if not shape:
        raise ValueError("save() needs example_inputs: the report records no input shape (the "
                         "model was compiled without calibration data)")
    p = next(compiled.graph_module.parameters(), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    return (torch.randn(2, *shape, **kw),)


def _kernel_table(compiled: CompiledModel) -> dict[str, dict[str, Any]]:
    """Each gated layer's eager CPU kernel, from its :class:`~ispc.records.KernelChoice` (a layer
    without one, in a graph not built by ispc's passes: the kernel its module runs)."""
    nodes = {n.target: n for n in compiled.graph_module.graph.nodes if n.op == "call_module"}
    table = {}
    for name, m in compiled.gated_modules().items():
        choice = records(nodes[name]).kernel if name in nodes else None
        if choice is not None:
            strategy, orient = choice.strategy, ORIENTATIONS.get(choice.orient, native.ORIENT_PIX)
        else:
            strategy, orient = m.strategy, m.orient
        table[name] = {"strategy": strategy, "orient": int(orient)}
    return table


def _restore_kernels(gm: fx.GraphModule, modules: dict[str, Any]) -> None:
    """Each gated layer's kernel as the archive names it (its prepared weights are rebuilt),
    recorded on its node (``cost_model="archive"``)."""
    if not isinstance(modules, dict):
        raise ArchiveError("bad module table in the archive")
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    names = {code: name for name, code in ORIENTATIONS.items()}
    for name, info in modules.items():
        strategy = info.get("strategy") if isinstance(info, dict) else None
        if not isinstance(name, str) or not isinstance(strategy, str):
            raise ArchiveError(f"bad module entry {name!r} in the archive")
        node = nodes.get(name)
        if node is None or not isinstance(m := gm.get_submodule(name), GatedConv2d):
            continue  # the layer came back under another name (see modularize)
        orient = info.get("orient")
        if strategy == "native" and not native.available():
            strategy, orient = "gemm", None  # saved where the native kernel was built; not here
        if orient is not None and not isinstance(orient, int):
            raise ArchiveError(f"bad kernel orientation {orient!r} for {name!r} in the archive")
        if strategy not in STRATEGIES or (orient is not None and orient not in names):
            raise ArchiveError(f"bad kernel strategy for {name!r}: {strategy!r}, orientation {orient!r}")
        choice = KernelChoice(strategy=strategy, cost_model="archive",
                              orient=names.get(orient) if strategy == "native" else None)
        try:
            apply_kernel(node, choice, m)
        except ValueError as exc:
            raise ArchiveError(f"bad kernel strategy for {name!r}: {exc}") from None


def _config_from_dict(d: dict[str, Any]) -> tuple[GatingConfig, list[str]]:
    names = {f.name for f in dataclasses.fields(GatingConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    dropped = list(kw.pop("leaf_modules", None) or [])
    if kw.get("include") is not None:
        kw["include"] = tuple(kw["include"])
    if "exclude" in kw:
        kw["exclude"] = tuple(kw["exclude"])
    return GatingConfig(**kw), dropped


def save(compiled: CompiledModel, path: str | Path, example_inputs: Any = None) -> Path:
    """Write ``compiled`` to ``path`` (a zip archive; see the module docstring for the format).

    ``example_inputs`` (one Tensor or a tuple) fixes every dimension but the batch; by default a
    random batch of the calibration input shape recorded in the report.
    Returns the path written.
    """
    if not isinstance(compiled, CompiledModel):
        raise TypeError(f"save() takes an ispc.CompiledModel, got {type(compiled).__name__}")
    example = example_inputs if example_inputs is not None else _default_example(compiled)
    ep = export_program(compiled, example, dynamic_batch=True)
    gm = compiled.graph_module
    arg_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    with eval_mode(gm), torch.no_grad():
        eager_spec = pytree.tree_structure(gm(*as_example_inputs(example)))
    program, tensors = program_to_json(ep, arg_names, eager_spec)
    modules = _kernel_table(compiled)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "torch_version": torch.__version__,
        "backend": compiled.backend, "config": compiled.config.to_dict(),
        "report": compiled.report.to_dict(), "program": program, "modules": modules,
        "layout": "channels_last" if runs_channels_last(gm) else "contiguous",
    }
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(_MANIFEST, json.dumps(manifest, allow_nan=False))
        zf.writestr(_WEIGHTS, buf.getvalue())
    return path


def load(path: str | Path, *, device: str | torch.device | None = None) -> CompiledModel:
    """Read a model written by :func:`save`. No Python objects are unpickled (see module docs).

    ``device``: where to put the weights (default: CPU). The backend it was saved with is
    attached again where it needs nothing the archive does not hold (``Backend.reloads``: eager,
    inductor); any other comes back as ``"eager"`` (engines are not part of the archive), with a
    note in the report.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(_MANIFEST).decode("utf-8"))
            weights = zf.read(_WEIGHTS)
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{path} is not an ispc archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(f"{path} is not an ispc archive (format {manifest.get('format')!r})"
                           if isinstance(manifest, dict) else f"{path} is not an ispc archive")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{path} has archive format version {manifest.get('format_version')}; "
                           f"this ispc reads version {FORMAT_VERSION}")
    try:
        tensors = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArchiveError(f"cannot read the weights of {path} with torch.load(weights_only=True): "
                           f"{exc}") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and type(v) is Tensor for k, v in tensors.items()):
        raise ArchiveError(f"the weights of {path} are not a flat dict of tensors")
    config, dropped = _config_from_dict(manifest.get("config") or {})
    report = Report.from_dict(manifest.get("report") or {})
    gm = program_from_json(manifest["program"], tensors)
    modularize(gm, config.saliency)
    _restore_kernels(gm, manifest.get("modules") or {})
    if manifest.get("layout") == "channels_last":  # the exported program has no layout of its own
        insert_converters(gm)
    reload(gm, config)  # the archive holds the epilogues as ATen add/relu nodes: fuse them again
    if device is not None:
        gm.to(device)
    gm.eval()
    if dropped:
        report.notes.append(f"leaf_modules {dropped} were not restored by ispc.load (classes are "
                            "not re-imported from names); the loaded config has leaf_modules=()")
    name = manifest.get("backend", "eager")
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None or not backend.reloads:
        report.notes.append(f"saved with backend {name!r}; loaded as 'eager' (compile it again "
                            "for that backend)")
        backend = BACKENDS["eager"]
    compiled = CompiledModel(gm, report, config, backend=backend.name)
    backend.attach(compiled, None)
    return compiled
