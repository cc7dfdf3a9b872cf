"""TensorRT lowering of compiled models through Torch-TensorRT's dynamo path.

:func:`compile_tensorrt` exports the compiled model (:func:`ispc.export.export_program`) and builds
engines with ``torch_tensorrt.dynamo.compile``. Each ``torch.ops.ispc.gated_conv2d.default`` node
(:data:`CONVERTER_TARGET`) is converted by one of three converters, tried in this order:

1. **topk** (and layers that keep every channel), ``ConverterPriority.HIGH``: a static-k
   decomposition into TensorRT layers, :func:`decompose` on a :class:`TRTBuilder`:
   channel saliency (``IReduceLayer`` sum of squares -> sqrt -> times ``1/sqrt(H*W)`` -> times
   ``scale``; or mean of abs), ``ITopKLayer`` (k is a build-time constant), then

   * static batch: ``IGatherLayer`` with one element-wise (batch) dimension picks each
     instance's k input channels (N x k x H x W); a second gather picks the matching weight
     columns (Cout x N x k x kh x kw), transposed and reshaped to (N*Cout) x k x kh x kw and fed
     to an ``IConvolutionLayer`` as a *runtime* weight with ``num_groups = N`` over the batch
     folded into channels: the engine really runs k/C of the MACs. Needs a static batch
     (the group count is fixed at build time).
   * dynamic batch: the masked-dense form (``IScatterLayer`` of ones at the TopK indices, a
     multiply, the dense convolution): exact, any batch, but dense MACs.

2. **threshold** (and topk with ``topk_route="plugin"``), static C, H, W: two TensorRT plugins
   compiled ahead of time from ispc's Triton kernels (:mod:`ispc.backends.tensorrt_aot`,
   ``@tensorrt.plugin.aot_impl``): selection, then the tensor-core convolution over each
   instance's kept channels, PTX inside the engine, no Python at run time. Where TensorRT has no
   ``aot_impl``: **threshold, stride 1** takes a plugin generated from the custom op with
   ``torch_tensorrt.dynamo.conversion.plugins.custom_op("ispc::gated_conv2d")`` (Quick
   Deployable Plugin, JIT: at run time it calls ``torch.ops.ispc.gated_conv2d`` on TensorRT's
   stream, a callback into Python per call). That one is restricted to stride 1 because
   Torch-TensorRT's generated shape descriptor lambdifies the fake kernel's symbolic output size,
   and for stride > 1 that expression contains torch's ``FloorDiv``, which ``sympy.lambdify``
   prints as an undefined name (reproduced on CPU in the tests); the AOT plugin's descriptor is
   written by hand and takes any stride.
3. **threshold, otherwise**: the masked-dense form in TensorRT layers (saliency ->
   ``NOT(s < threshold)`` -> multiply -> dense convolution): exact, in-engine, dense MACs.

The topk decomposition's weight gather copies ``N * k / C`` of the layer's weights per call (every
instance's k input channels of every output channel); the AOT plugin reads the packed weights in
place, so at large batches ``topk_route="plugin"`` may be the faster engine (never measured).

:func:`save_engine` / :func:`load_engine` wrap ``torch_tensorrt.save`` / ``torch_tensorrt.load``;
loading registers the converters and the plugin first (a saved engine with the plugin layer
needs the plugin registered in the loading process), as does importing this module on a machine
where CUDA and torch_tensorrt are present. ``torch_tensorrt.load`` reads a ``torch.export``
archive, which can unpickle objects: load only engines you trust (unlike :func:`ispc.load`).

Status (be exact): torch_tensorrt and TensorRT cannot be installed on the machines this was
written on (no NVIDIA driver), so **none of the TensorRT code paths have been run**: the
converters, :class:`TRTBuilder`, the plugin registrations (JIT and AOT), ``compile_tensorrt``,
``save_engine``/``load_engine``. They are written against the documented Torch-TensorRT 2.x API
(``dynamo_tensorrt_converter``, ``ConversionContext.net``, ``get_trt_tensor``,
``plugins.custom_op``), the TensorRT 10 Python network API and ``tensorrt.plugin``
(``register``, ``autotune``, ``aot_impl``, ``KernelLaunchParams``, ``SymInt32``). What *is*
tested (CPU): the AOT plugins' kernel specifications, their compilation to PTX for sm_90 and its
parameter list (:mod:`ispc.backends.tensorrt_aot`), and

- the decomposition logic itself: :func:`decompose` is written once against a builder interface
  and :class:`TorchBuilder` runs it with plain PyTorch ops that follow TensorRT's layer semantics
  (gather with element-wise dims, shuffle = transpose then reshape with 0 = copy, grouped conv),
  checked against ``gated_conv2d_reference`` in every branch (topk gathered/masked, threshold,
  k = 0, all kept, l1/l2 saliency); only the one-to-one mapping of each builder primitive to a
  TensorRT layer in :class:`TRTBuilder` is unverified;
- the capability validators (which converter takes which node) on real exported nodes;
- that the exported graph (also after ``run_decompositions``) holds exactly
  :data:`CONVERTER_TARGET` for every gated layer;
- the missing-dependency errors (:class:`ispc.errors.BackendUnavailableError`).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiled import CompiledModel
from ..errors import BackendUnavailableError
from ..export import as_example_inputs, export_program, graph_module_of
from ..ops import gated_conv as _gc
from ..ops import triton_gated_conv
from . import tensorrt_aot

__all__ = ["compile_tensorrt", "save_engine", "load_engine", "register_converters",
           "require_tensorrt", "decompose", "decompose_reference", "TorchBuilder", "TRTBuilder",
           "CONVERTER_TARGET", "gated_args", "takes_topk_converter", "takes_plugin",
           "takes_aot_plugin", "takes_masked_threshold", "TOPK_ROUTES"]

_LOG = logging.getLogger(__name__)

#: the node target the converters are registered for
CONVERTER_TARGET = torch.ops.ispc.gated_conv2d.default
_PLUGIN_NAME = "ispc::gated_conv2d"
_state: dict[str, Any] = {"converters": False, "plugin": False, "aot": False,
                          "topk_route": "decompose"}
#: how topk layers are converted: TensorRT layers, or the AOT plugins
TOPK_ROUTES = ("decompose", "plugin")


# --- dependencies -------------------------------------------------------------------------------

def require_tensorrt() -> Any:
    """Import torch_tensorrt on a CUDA machine, or raise :class:`BackendUnavailableError`."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the TensorRT backend needs an NVIDIA GPU with CUDA; torch.cuda.is_available() is "
            "False here (use backend='eager' or 'inductor', or export to ONNX)")
    if importlib.util.find_spec("torch_tensorrt") is None:
        raise BackendUnavailableError(
            "the TensorRT backend needs torch-tensorrt (matching your torch version), e.g. "
            "`pip install torch-tensorrt`; it is not installed")
    try:
        import torch_tensorrt
    except Exception as exc:  # e.g. a driver / TensorRT library mismatch
        raise BackendUnavailableError(f"torch_tensorrt is installed but cannot be imported: "
                                      f"{type(exc).__name__}: {exc}") from None
    return torch_tensorrt


# --- node inspection (used by the capability validators) ----------------------------------------

def gated_args(node: Any) -> dict[str, Any]:
    """A gated_conv2d node's arguments by name (positional or keyword)."""
    out = dict(zip(_gc.ARG_NAMES, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in _gc.ARG_NAMES})
    return out


def _static_spatial(node: Any) -> bool:
    x = gated_args(node).get("x")
    val = getattr(x, "meta", {}).get("val") if x is not None else None
    if val is None:
        return False
    return all(isinstance(d, int) for d in val.shape[1:])


def _kept_all(a: dict[str, Any]) -> bool:
    w = getattr(a.get("weight"), "meta", {}).get("val")
    channels = int(w.shape[1]) if w is not None else None
    if channels is None:
        return False
    return _gc._kept_all(a["mode"], a["threshold"], a["k"], channels)


def takes_topk_converter(node: Any, settings: Any = None) -> bool:
    """topk layers (and layers keeping every channel), with static C, H, W; topk layers go to
    the AOT plugins instead when ``topk_route="plugin"`` and they are registered."""
    a = gated_args(node)
    if _kept_all(a):
        return _static_spatial(node)
    return (_static_spatial(node) and a.get("mode") == _gc.TOPK
            and not (_state["aot"] and _state["topk_route"] == "plugin"))


def _map_dtype_ok(node: Any) -> bool:
    val = getattr(gated_args(node).get("x"), "meta", {}).get("val")
    return val is not None and val.dtype in (torch.float32, torch.float16, torch.bfloat16)


def takes_aot_plugin(node: Any, settings: Any = None) -> bool:
    """Gated layers (threshold; topk with ``topk_route="plugin"``) with static C, H, W and
    float32/float16/bfloat16 maps, once the AOT plugins are registered."""
    a = gated_args(node)
    mode = a.get("mode")
    route = mode == _gc.THRESHOLD or (mode == _gc.TOPK and _state["topk_route"] == "plugin")
    return (bool(_state["aot"]) and route and not _kept_all(a) and _static_spatial(node)
            and _map_dtype_ok(node))


def takes_plugin(node: Any, settings: Any = None) -> bool:
    """threshold layers with stride 1 (the generated plugin's shape descriptor handles those),
    where the AOT plugins are not registered."""
    a = gated_args(node)
    return (a.get("mode") == _gc.THRESHOLD and a.get("stride_h") == 1 and a.get("stride_w") == 1
            and bool(_state["plugin"]) and not _state["aot"])


def takes_masked_threshold(node: Any, settings: Any = None) -> bool:
    """threshold layers (any stride) with static C, H, W: masked-dense TensorRT layers."""
    return gated_args(node).get("mode") == _gc.THRESHOLD and _static_spatial(node)


# --- the decomposition, written once against a builder -----------------------------------------

def decompose(b: Any, x: Any, weight: Any, bias: Any, scale: Any, stride: Sequence[int],
              pad: Sequence[int], dil: Sequence[int], mode: int, threshold: float, k: int,
              saliency: int) -> Any:
    """The gated convolution as a sequence of TensorRT-style layers on builder ``b``.

    ``b`` is a :class:`TRTBuilder` (inside a converter) or a :class:`TorchBuilder` (tests).
    """
    n, (_, c, h, w) = b.batch(x), b.shape(x)
    cout, _, kh, kw = b.shape(weight)
    stride, pad, dil = tuple(stride), tuple(pad), tuple(dil)
    if _gc._kept_all(mode, threshold, k, c):
        return b.conv(x, weight, bias, stride, pad, dil, 1)
    xf = b.cast_float(x)
    if saliency == _gc.SALIENCY_L2:
        s = b.unary(b.reduce_hw(b.binary(xf, xf, "mul"), "sum"), "sqrt")
        s = b.binary(s, b.const(np.full((1, 1), 1.0 / math.sqrt(max(h * w, 1)), np.float32)),
                     "mul")
    elif saliency == _gc.SALIENCY_L1:
        s = b.reduce_hw(b.unary(xf, "abs"), "mean")
    else:
        raise ValueError(f"unknown saliency code {saliency}")
    s = b.binary(s, b.reshape(b.cast_float(scale), (1, c)), "mul")  # [N, C]
    if mode == _gc.THRESHOLD:
        below = b.binary(s, b.const(np.full((1, 1), threshold, np.float32)), "less")
        return _masked(b, x, b.to_float(b.unary(below, "not")), weight, bias, stride, pad, dil, c)
    if mode != _gc.TOPK:
        raise ValueError(f"unknown gating mode {mode}")
    if k <= 0:  # nothing kept: conv of zeros = bias
        zero = b.binary(s, b.const(np.zeros((1, 1), np.float32)), "mul")
        return _masked(b, x, zero, weight, bias, stride, pad, dil, c)
    values, idx = b.topk(s, k)  # [N, k] each
    if n < 0:  # dynamic batch: masked-dense form
        zeros = b.binary(s, b.const(np.zeros((1, 1), np.float32)), "mul")
        ones = b.binary(b.binary(values, b.const(np.zeros((1, 1), np.float32)), "mul"),
                        b.const(np.ones((1, 1), np.float32)), "add")
        return _masked(b, x, b.scatter_elements(zeros, idx, ones, 1), weight, bias, stride, pad,
                       dil, c)
    # static batch: gather each instance's channels, one grouped conv over batch-as-channels
    xg = b.gather(x, idx, axis=1, elementwise_dims=1)  # [N, k, H, W]
    xg = b.shuffle(xg, reshape=(1, n * k, h, w))
    wg = b.gather(weight, idx, axis=1, elementwise_dims=0)  # [Cout, N, k, kh, kw]
    wg = b.shuffle(wg, transpose=(1, 0, 2, 3, 4), reshape=(n * cout, k, kh, kw))
    bg = b.tile(bias, n)  # [N * Cout]
    y = b.conv(xg, wg, bg, stride, pad, dil, n)  # [1, N * Cout, Ho, Wo]
    return b.shuffle(y, reshape=(n, cout, 0, 0))


def _masked(b: Any, x: Any, mask: Any, weight: Any, bias: Any, stride, pad, dil, c: int) -> Any:
    m = b.cast_like(b.shuffle(mask, reshape=(0, c, 1, 1)), x)
    return b.conv(b.binary(x, m, "mul"), weight, bias, stride, pad, dil, 1)


class TorchBuilder:
    """Runs :func:`decompose` with PyTorch ops that follow TensorRT's layer semantics.

    ``dynamic_batch=True`` makes :meth:`shape` report the batch as -1, as TensorRT does for a
    dynamic dimension, which selects the masked form.
    """

    def __init__(self, dynamic_batch: bool = False) -> None:
        self.dynamic_batch = dynamic_batch

    def shape(self, t: Tensor) -> tuple[int, ...]:
        return tuple(int(d) for d in t.shape)

    def batch(self, x: Tensor) -> int:
        return -1 if self.dynamic_batch else int(x.shape[0])

    def const(self, a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    def cast_float(self, t: Tensor) -> Tensor:
        return t.to(torch.float32)

    def cast_like(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.dtype)

    def to_float(self, t: Tensor) -> Tensor:
        return t.to(torch.float32)

    def reduce_hw(self, t: Tensor, op: str) -> Tensor:
        return t.sum(dim=(2, 3)) if op == "sum" else t.mean(dim=(2, 3))

    def unary(self, t: Tensor, op: str) -> Tensor:
        return {"sqrt": torch.sqrt, "abs": torch.abs, "not": torch.logical_not}[op](t)

    def binary(self, a: Tensor, b: Tensor, op: str) -> Tensor:
        if a.dim() != b.dim():
            raise ValueError("TensorRT elementwise layers need equal ranks")
        return {"mul": torch.mul, "add": torch.add, "less": torch.lt}[op](a, b)

    def reshape(self, t: Tensor, shape: Sequence[int]) -> Tensor:
        return t.reshape(tuple(shape))

    def shuffle(self, t: Tensor, transpose: Sequence[int] | None = None,
                reshape: Sequence[int] | None = None) -> Tensor:
        if transpose is not None:
            t = t.permute(*transpose)
        if reshape is not None:  # 0 copies the input dimension (TensorRT's zero_is_placeholder)
            t = t.reshape(tuple(t.shape[i] if d == 0 else d for i, d in enumerate(reshape)))
        return t

    def topk(self, s: Tensor, k: int) -> tuple[Tensor, Tensor]:
        v, i = torch.topk(s, k, dim=1, largest=True, sorted=True)
        return v, i.to(torch.int32)

    def gather(self, data: Tensor, idx: Tensor, axis: int, elementwise_dims: int) -> Tensor:
        idx = idx.long()
        if elementwise_dims == 0:  # out = data.shape[:axis] + idx.shape + data.shape[axis+1:]
            return data.index_select(axis, idx.reshape(-1)).reshape(
                data.shape[:axis] + idx.shape + data.shape[axis + 1:])
        assert elementwise_dims == 1 and axis == 1 and idx.dim() == 2
        return torch.stack([data[i].index_select(0, idx[i]) for i in range(data.shape[0])])

    def scatter_elements(self, data: Tensor, idx: Tensor, updates: Tensor, axis: int) -> Tensor:
        return data.scatter(axis, idx.long(), updates)

    def tile(self, t: Tensor, n: int) -> Tensor:
        return t.repeat(n)

    def conv(self, x: Tensor, w: Tensor, b: Tensor, stride, pad, dil, groups: int) -> Tensor:
        return F.conv2d(x, w.to(x.dtype), b.to(x.dtype), stride, pad, dil, groups)


def decompose_reference(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                        stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                        threshold: float, k: int, saliency: int = _gc.SALIENCY_L2, *,
                        dynamic_batch: bool = False) -> Tensor:
    """What the TensorRT network built by the converters computes, in plain PyTorch."""
    return decompose(TorchBuilder(dynamic_batch), x, weight, bias, scale, (stride_h, stride_w),
                     (pad_h, pad_w), (dil_h, dil_w), mode, threshold, k, saliency)


class TRTBuilder:
    """The builder primitives as TensorRT layers on ``ctx.net`` (UNTESTED: no TensorRT here)."""

    def __init__(self, ctx: Any, name: str) -> None:
        import tensorrt as trt
        from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

        self.trt, self.ctx, self.net, self.name = trt, ctx, ctx.net, name
        self._get = get_trt_tensor
        self._n = 0

    def _name(self, layer: Any, what: str) -> Any:
        self._n += 1
        layer.name = f"{self.name}_{what}_{self._n}"
        return layer.get_output(0)

    def tensor(self, value: Any, what: str) -> Any:
        """A weight/constant argument as an ITensor (numpy / torch -> constant layer)."""
        if isinstance(value, (Tensor, np.ndarray)):
            self._n += 1
            return self._get(self.ctx, value, f"{self.name}_{what}_{self._n}")
        return value

    def shape(self, t: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in t.shape)  # ITensor (-1: dynamic) or torch constant

    def batch(self, x: Any) -> int:
        return int(x.shape[0])

    def const(self, a: np.ndarray) -> Any:
        return self.tensor(np.ascontiguousarray(a), "const")

    def cast_float(self, t: Any) -> Any:
        if isinstance(t, (Tensor, np.ndarray)):
            return self.tensor(torch.as_tensor(t).to(torch.float32), "const")
        if t.dtype == self.trt.float32:
            return t
        return self._name(self.net.add_cast(t, self.trt.float32), "cast")

    def cast_like(self, t: Any, like: Any) -> Any:
        if t.dtype == like.dtype:
            return t
        return self._name(self.net.add_cast(t, like.dtype), "cast")

    def to_float(self, t: Any) -> Any:
        return self._name(self.net.add_cast(t, self.trt.float32), "cast")

    def reduce_hw(self, t: Any, op: str) -> Any:
        red = self.trt.ReduceOperation.SUM if op == "sum" else self.trt.ReduceOperation.AVG
        return self._name(self.net.add_reduce(t, red, (1 << 2) | (1 << 3), False), "reduce")

    def unary(self, t: Any, op: str) -> Any:
        u = {"sqrt": self.trt.UnaryOperation.SQRT, "abs": self.trt.UnaryOperation.ABS,
             "not": self.trt.UnaryOperation.NOT}[op]
        return self._name(self.net.add_unary(t, u), op)

    def binary(self, a: Any, b: Any, op: str) -> Any:
        e = {"mul": self.trt.ElementWiseOperation.PROD, "add": self.trt.ElementWiseOperation.SUM,
             "less": self.trt.ElementWiseOperation.LESS}[op]
        return self._name(self.net.add_elementwise(a, b, e), op)

    def reshape(self, t: Any, shape: Sequence[int]) -> Any:
        return self.shuffle(t, reshape=shape)

    def shuffle(self, t: Any, transpose: Sequence[int] | None = None,
                reshape: Sequence[int] | None = None) -> Any:
        layer = self.net.add_shuffle(t)
        if transpose is not None:
            layer.first_transpose = self.trt.Permutation(list(transpose))
        if reshape is not None:
            layer.reshape_dims = tuple(int(d) for d in reshape)
            layer.zero_is_placeholder = True
        return self._name(layer, "shuffle")

    def topk(self, s: Any, k: int) -> tuple[Any, Any]:
        layer = self.net.add_topk(s, self.trt.TopKOperation.MAX, int(k), 1 << 1)
        self._n += 1
        layer.name = f"{self.name}_topk_{self._n}"
        return layer.get_output(0), layer.get_output(1)

    def gather(self, data: Any, idx: Any, axis: int, elementwise_dims: int) -> Any:
        layer = self.net.add_gather(self.tensor(data, "weight"), idx, axis)
        layer.num_elementwise_dims = int(elementwise_dims)
        return self._name(layer, "gather")

    def scatter_elements(self, data: Any, idx: Any, updates: Any, axis: int) -> Any:
        layer = self.net.add_scatter(data, idx, updates, self.trt.ScatterMode.ELEMENT)
        layer.axis = int(axis)
        return self._name(layer, "scatter")

    def tile(self, t: Any, n: int) -> Any:
        if isinstance(t, (Tensor, np.ndarray)):
            arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else t
            return np.tile(arr, n)
        return self._name(self.net.add_concatenation([t] * n), "tile")

    def conv(self, x: Any, w: Any, b: Any, stride, pad, dil, groups: int) -> Any:
        trt = self.trt
        w_np = w.detach().cpu().numpy() if isinstance(w, Tensor) else w
        b_np = b.detach().cpu().numpy() if isinstance(b, Tensor) else b
        w_const, b_const = isinstance(w_np, np.ndarray), isinstance(b_np, np.ndarray)
        shape = w_np.shape if w_const else self.shape(w_np)
        layer = self.net.add_convolution_nd(
            x, int(shape[0]), trt.Dims(tuple(int(d) for d in shape[2:])),
            trt.Weights(np.ascontiguousarray(w_np, dtype=np.float32)) if w_const else trt.Weights(),
            trt.Weights(np.ascontiguousarray(b_np, dtype=np.float32)) if b_const else trt.Weights())
        if not w_const:  # runtime weights (the gathered per-instance slices)
            layer.set_input(1, w_np)
        if not b_const:
            layer.set_input(2, b_np)
        layer.stride_nd = tuple(stride)
        layer.padding_nd = tuple(pad)
        layer.dilation_nd = tuple(dil)
        layer.num_groups = int(groups)
        return self._name(layer, "conv")


# --- converters / plugin registration ------------------------------------------------------------

def _decomposition_converter(ctx: Any, target: Any, args: tuple, kwargs: dict, name: str) -> Any:
    """Torch-TensorRT converter: :func:`decompose` on a :class:`TRTBuilder`."""
    a = dict(zip(_gc.ARG_NAMES, args))
    a.update(kwargs)
    weight, bias = a["weight"], a["bias"]
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if isinstance(bias, np.ndarray):
        bias = torch.from_numpy(bias)
    return decompose(TRTBuilder(ctx, name), a["x"], weight, bias, a["scale"],
                     (a["stride_h"], a["stride_w"]), (a["pad_h"], a["pad_w"]),
                     (a["dil_h"], a["dil_w"]), int(a["mode"]), float(a["threshold"]), int(a["k"]),
                     int(a["saliency"]))


def register_converters() -> None:
    """Register the converters (and the plugin) with Torch-TensorRT. Idempotent.

    Raises :class:`BackendUnavailableError` without CUDA or torch_tensorrt.
    """
    if _state["converters"]:
        return
    torch_tensorrt = require_tensorrt()
    from torch_tensorrt.dynamo.conversion import ConverterPriority, dynamo_tensorrt_converter

    dynamo_tensorrt_converter(CONVERTER_TARGET, capability_validator=takes_topk_converter,
                              priority=ConverterPriority.HIGH,
                              supports_dynamic_shapes=True)(_decomposition_converter)

    try:
        if tensorrt_aot.register_aot_plugins():
            dynamo_tensorrt_converter(CONVERTER_TARGET, capability_validator=takes_aot_plugin,
                                      priority=ConverterPriority.HIGH,
                                      supports_dynamic_shapes=True)(tensorrt_aot.aot_converter)
            _state["aot"] = True
    except Exception as exc:  # an API that differs from the documented one: the JIT plugin
        _LOG.warning("ispc: AOT TensorRT plugins not registered (%s: %s)", type(exc).__name__,
                     exc)
    try:

        if not triton_gated_conv.register_cuda_kernel():
            raise RuntimeError("triton is not installed (the plugin runs the Triton kernel)")
        torch_tensorrt.dynamo.conversion.plugins.custom_op(
            _PLUGIN_NAME, capability_validator=takes_plugin, priority=ConverterPriority.HIGH,
            supports_dynamic_shapes=True)
        _state["plugin"] = True
    except Exception as exc:  # TensorRT < 10.7 (no QDP), no triton, ...
        _LOG.warning("ispc: threshold-mode TensorRT plugin unavailable (%s: %s); threshold "
                     "layers use the masked-dense TensorRT form", type(exc).__name__, exc)
    dynamo_tensorrt_converter(CONVERTER_TARGET, capability_validator=takes_masked_threshold,
                              priority=ConverterPriority.STANDARD,
                              supports_dynamic_shapes=True)(_decomposition_converter)
    _state["converters"] = True


def compile_tensorrt(compiled: CompiledModel | torch.nn.Module, example_inputs: Any, *,
                     dynamic_batch: bool = False, max_batch: int | None = None,
                     topk_route: str = "decompose", **settings: Any) -> torch.nn.Module:
    """Build TensorRT engines for a compiled model with ``torch_tensorrt.dynamo.compile``.

    Args:
        compiled: an :class:`ispc.CompiledModel` (its ``graph_module`` is used; not modified).
        example_inputs: one Tensor or a tuple; moved to CUDA.
        dynamic_batch: build for batch sizes 1..``max_batch`` (default: 2x the example batch).
            topk layers then use the masked-dense form (exact, dense MACs); with a static batch
            (default) they gather each instance's channels and run k/C of the MACs.
        topk_route: ``"decompose"`` (topk layers as TensorRT layers) or ``"plugin"`` (the AOT
            Triton plugins, where registered).
        **settings: passed to ``torch_tensorrt.dynamo.compile`` (e.g. ``enabled_precisions``,
            ``workspace_size``); ``min_block_size`` defaults to 1.

    Returns:
        the Torch-TensorRT module (callable like the model).
    """
    if topk_route not in TOPK_ROUTES:
        raise ValueError(f"topk_route must be one of {TOPK_ROUTES}, got {topk_route!r}")
    torch_tensorrt = require_tensorrt()
    register_converters()
    _state["topk_route"] = topk_route

    args = tuple(a.cuda() if isinstance(a, Tensor) else a
                 for a in as_example_inputs(example_inputs))
    module = copy.deepcopy(graph_module_of(compiled)).cuda().eval()
    ep = export_program(module, args, dynamic_batch=dynamic_batch)
    if dynamic_batch:
        n = int(args[0].shape[0])
        top = int(max_batch or max(2 * n, 2))
        inputs = [torch_tensorrt.Input(min_shape=(1,) + tuple(a.shape[1:]),
                                       opt_shape=tuple(a.shape),
                                       max_shape=(top,) + tuple(a.shape[1:]), dtype=a.dtype)
                  if isinstance(a, Tensor) else a for a in args]
    else:
        inputs = list(args)
    settings.setdefault("min_block_size", 1)
    return torch_tensorrt.dynamo.compile(ep, arg_inputs=inputs, **settings)


def save_engine(trt_module: torch.nn.Module, path: str, example_inputs: Any, **kwargs: Any) -> None:
    """Save a module from :func:`compile_tensorrt` with ``torch_tensorrt.save``."""
    torch_tensorrt = require_tensorrt()
    args = [a.cuda() if isinstance(a, Tensor) else a for a in as_example_inputs(example_inputs)]
    kwargs.setdefault("output_format", "exported_program")
    torch_tensorrt.save(trt_module, str(path), arg_inputs=args, **kwargs)


def load_engine(path: str) -> torch.nn.Module:
    """Load an engine saved by :func:`save_engine` (registers ispc's plugin first).

    Only load files you trust: ``torch_tensorrt.load`` reads a torch.export archive.
    """
    torch_tensorrt = require_tensorrt()
    register_converters()
    loaded = torch_tensorrt.load(str(path))
    return loaded.module() if hasattr(loaded, "module") else loaded


def _register_on_import() -> None:
    """Best effort: register the plugin at import where CUDA and torch_tensorrt exist."""
    if not torch.cuda.is_available() or importlib.util.find_spec("torch_tensorrt") is None:
        return
    try:
        register_converters()
    except Exception as exc:  # never fail `import ispc.backends.tensorrt`
        _LOG.warning("ispc: could not register TensorRT converters on import: %s", exc)


_register_on_import()
