"""Save and load compiled models without unpickling arbitrary objects (the archive).

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
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from ..backends import BACKENDS
from ..compiled import CompiledModel
from ..config import GatingConfig
from ..dense_route import DenseRuntimeModule, require_runtime, routed, wrap
from ..errors import ArchiveError
from ..export import as_example_inputs, eval_mode, export_program
from ..modules import ORIENTATIONS, GatedConv2d, NhwcDenseConv2d
from ..ops import native
from ..ops import linear_kernels
from ..ops.cpu_kernels import STRATEGIES
from ..passes import apply_kernel, records
from ..passes.base import replace_submodule
from ..passes.channels_last import insert_converters, runs_channels_last
from ..pipeline import reload
from ..records import KernelChoice
from ..report import Report
from .modularize import modularize
from .program import program_from_json, program_to_json

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "ispc.compiled"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "weights.pt"
_ROUTE = "dense_route.onnx"


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
    for name, m in compiled.graph_module.named_modules():
        if isinstance(m, NhwcDenseConv2d):  # a dense layer on the channels-last kernels
            table[name] = {"strategy": "nhwc", "dense": True}
            if m.out_hw is not None:
                table[name]["out_hw"] = int(m.out_hw)
    for name, m in compiled.gated_modules().items():
        choice = records(nodes[name]).kernel if name in nodes else None
        if choice is not None:
            strategy, orient = choice.strategy, ORIENTATIONS.get(choice.orient, native.ORIENT_PIX)
        else:
            strategy, orient = m.strategy, m.orient
        table[name] = {"strategy": strategy, "orient": int(orient)}
        if m.out_hw is not None:  # the nhwc kernel's register tile is chosen for it
            table[name]["out_hw"] = int(m.out_hw)
        if choice is not None and choice.winograd is not None:  # timed at compile: kept
            table[name]["winograd"] = bool(choice.winograd)
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
        if node is not None and info.get("dense") is True:
            _restore_dense(gm, name, node, info)
            continue
        if node is not None and strategy == "nhwc" and type(gm.get_submodule(name)) is nn.Conv2d:
            # a gated layer that keeps every channel is exported as its dense convolution: it
            # goes back on the kernel's dense mode, as it ran before saving
            _restore_dense(gm, name, node, {k: v for k, v in info.items() if k in ("strategy", "out_hw")})
            continue
        if node is None or not isinstance(m := gm.get_submodule(name), GatedConv2d):
            continue  # the layer came back under another name (see modularize)
        orient = info.get("orient")
        if strategy == "native" and not native.available():
            strategy, orient = "gemm", None  # saved where the native kernel was built; not here
        if strategy == "nhwc" and not linear_kernels.nhwc_available():
            strategy, orient = "gather", None  # a gated linear layer runs gather as gemm
        out_hw = info.get("out_hw")
        if out_hw is not None and (not isinstance(out_hw, int) or out_hw < 1):
            raise ArchiveError(f"bad output size {out_hw!r} for {name!r} in the archive")
        if orient is not None and not isinstance(orient, int):
            raise ArchiveError(f"bad kernel orientation {orient!r} for {name!r} in the archive")
        winograd = info.get("winograd")
        if winograd is not None and not isinstance(winograd, bool):
            raise ArchiveError(f"bad Winograd flag {winograd!r} for {name!r} in the archive")
        known = STRATEGIES + linear_kernels.STRATEGIES
        if strategy not in known or (orient is not None and orient not in names):
            raise ArchiveError(f"bad kernel strategy for {name!r}: {strategy!r}, orientation {orient!r}")
        choice = KernelChoice(strategy=strategy, cost_model="archive",
                              orient=names.get(orient) if strategy == "native" else None,
                              winograd=winograd if strategy == "nhwc" else None)
        try:
            if out_hw is not None:
                m.out_hw = out_hw
            apply_kernel(node, choice, m)
        except ValueError as exc:
            raise ArchiveError(f"bad kernel strategy for {name!r}: {exc}") from None


def _restore_dense(gm: fx.GraphModule, name: str, node: fx.Node, info: dict[str, Any]) -> None:
    """A dense layer saved on the channels-last kernels goes back on them (weights packed here),
    where the native library is built; elsewhere it stays the plain convolution."""
    m = gm.get_submodule(name)
    out_hw = info.get("out_hw")
    if info.get("strategy") != "nhwc" or (out_hw is not None and (
            not isinstance(out_hw, int) or out_hw < 1)):
        raise ArchiveError(f"bad dense kernel entry for {name!r} in the archive: {info!r}")
    if type(m) is nn.Conv2d and native.available() and NhwcDenseConv2d.fits(m):
        replace_submodule(gm, name, NhwcDenseConv2d(m, out_hw))
        records(node).kernel = KernelChoice(strategy="nhwc", cost_model="archive")


def _rewrap(gm: fx.GraphModule, info: Any, onnx: bytes, path: str | Path) -> fx.GraphModule:
    """The saved dense route around the rebuilt graph (which computes the same dense model)."""
    runtime = info.get("runtime") if isinstance(info, dict) else None
    shape = info.get("input_shape") if isinstance(info, dict) else None
    if runtime not in ("onnxruntime", "openvino") or not isinstance(shape, list) or not all(
            isinstance(d, int) for d in shape):
        raise ArchiveError(f"bad dense route entry in {path}: {info!r}")
    require_runtime(runtime, f"{path} runs its dense model in {runtime} (its compile's dense "
                    "route); loading it")
    spinning = info.get("spinning", False)  # archives from before 0.17.0 stopped it
    if not isinstance(spinning, bool):
        raise ArchiveError(f"bad dense route entry in {path}: {info!r}")
    return wrap(gm, DenseRuntimeModule(gm, runtime, onnx, tuple(shape), info.get("decision"),
                                       spinning=spinning))


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
    route = routed(gm)
    if route is not None:  # the program is its torch model; the runtime's model rides beside
        manifest["dense_route"] = {"runtime": route.runtime, "input_shape": list(route.input_shape),
                                   "decision": route.decision, "spinning": route.spinning,
                                   "file": _ROUTE}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(_MANIFEST, json.dumps(manifest, allow_nan=False))
        zf.writestr(_WEIGHTS, buf.getvalue())
        if route is not None:
            zf.writestr(_ROUTE, route.onnx)
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
            route_info = manifest.get("dense_route") if isinstance(manifest, dict) else None
            route_onnx = zf.read(_ROUTE) if route_info is not None else None
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
    if route_info is not None:
        gm = _rewrap(gm, route_info, route_onnx, path)
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
