"""An exported program as JSON, and back (the ``program`` of an archive's manifest).

Operator targets are stored by name (``"aten::conv2d.default"``) and resolved on load only through
the operator registry (``torch.ops.<namespace>.<name>.<overload>``) or a fixed allow-list of
``operator``/``math``/``torch.sym_*`` functions; argument values are JSON scalars, lists, dtypes,
devices, layouts and memory formats. Nothing in the JSON can name an arbitrary Python object.
"""
from __future__ import annotations

import importlib
import math
import operator
import re
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from ..errors import ArchiveError, UnsupportedModelError

__all__ = ["program_to_json", "program_from_json"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


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


#: packages whose output classes register themselves as pytree nodes when their module is
#: imported (Hugging Face's ModelOutput subclasses): ispc.load imports the module an archive's
#: structure names, from these packages only, in a process that has not imported it yet
_PYTREE_PACKAGES = ("transformers",)
_TYPE_NAME = re.compile(r'"((?:%s)(?:\.\w+)+)"' % "|".join(_PYTREE_PACKAGES))


def _import_output_types(*specs: str) -> None:
    for spec in specs:
        for name in set(_TYPE_NAME.findall(spec if isinstance(spec, str) else "")):
            try:
                importlib.import_module(name.rsplit(".", 1)[0])
            except Exception:  # not installed: treespec_loads says which type is missing
                pass


def _codegen(program: dict[str, Any], n_user: int):
    _import_output_types(program.get("in_spec"), program.get("out_spec"))
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
