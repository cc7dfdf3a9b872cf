"""TensorRT plugins compiled ahead of time from ispc's Triton kernels (Quick Deployable Plugins with
``@tensorrt.plugin.aot_impl``): the gated convolution inside an engine with no Python at run time.

A gated layer becomes two plugin layers, each one Triton kernel compiled to PTX when the engine is
built and embedded in it:

- :data:`SELECT_PLUGIN` (``x``, ``scale`` -> ``idx[N, C]``, ``cnt[N]``, int32): saliency and
  selection, one program per instance (:func:`ispc.ops._triton_kernels.select_fused_kernel`); the
  gate (mode, threshold, k, saliency) is compiled in.
- :data:`CONV_PLUGIN` (``x``, packed weight, bias, ``idx``, ``cnt`` -> the output): the tensor-core
  convolution over each instance's kept channels (``gated_conv_kernel``); the geometry (kernel,
  stride, padding, dilation) and the float32 precision are compiled in.

Threshold mode needs it most (its kept-channel counts differ per instance, which no TensorRT layer
expresses); topk layers may take it too (``compile_tensorrt(..., topk_route="plugin")``) instead of
the layer decomposition, whose per-instance weight gather copies ``N * k / C`` of a layer's weights
per call.

The kernels already take their arguments as TensorRT launches an AOT plugin's kernel: input
pointers, then 32-bit integer scalars (``trtp.SymInt32``, TensorRT's only extra-argument type),
then output pointers; everything else is a compile-time constant here. Triton (>= 3.3) appends
scratch pointers after those; TensorRT passes null for arguments it was not given, which is what
Triton passes when the kernel needs no scratch (:func:`check_ptx_params` refuses a kernel that
does). Engines need static C, H and W (the validator's condition); the batch may be dynamic.

Status: TensorRT cannot be installed on the machines this was written on, so **the plugins have
never been registered or run**. What runs without TensorRT is tested: the kernel specifications
(:func:`select_spec`, :func:`conv_spec`) against the kernels' declarations, their compilation to
PTX for sm_90 by Triton on the CPU and the PTX's parameter list (:func:`check_ptx_params`), the
output-shape arithmetic (:func:`conv_out`) and the weight packing; the kernels themselves are
tested against the reference under Triton's interpreter (``tests/ispc/ops``).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BackendUnavailableError
from ..ops import gated_conv as _gc
from ..ops import triton_gated_conv as _tgc

__all__ = ["SELECT_PLUGIN", "CONV_PLUGIN", "KernelSpec", "select_spec", "conv_spec",
           "AOT_CONFIGS", "compile_spec", "check_ptx_params", "ptx_params", "conv_out",
           "register_aot_plugins", "aot_converter", "DTYPES"]

_LOG = logging.getLogger(__name__)

SELECT_PLUGIN = "ispc::select_channels"
CONV_PLUGIN = "ispc::gated_conv_indexed"
#: Triton element types of the maps the plugins take
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: the convolution tiling compiled into engines, per element type: shared memory under the 48 KB a
#: launch gets without raising its limit (TensorRT's launch parameters carry only the size)
AOT_CONFIGS = {"fp32": _tgc.Config(64, 64, 32, 4, 2), "fp16": _tgc.Config(64, 64, 64, 4, 2),
               "bf16": _tgc.Config(64, 64, 64, 4, 2)}
_SELECT_WARPS = 4
_state: dict[str, Any] = {"registered": False}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as an AOT plugin compiles it: the runtime parameters in declaration order
    (``inputs`` pointers, ``scalars`` int32, ``outputs`` pointers) with their Triton types, and the
    values of the parameters compiled in."""

    kernel: str
    types: dict[str, str]
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1

    @property
    def signature(self) -> dict[str, str]:
        """``ASTSource``'s signature: every parameter, the compiled-in ones as "constexpr"."""
        fn = _kernel_fn(self.kernel)
        return {name: ("constexpr" if name in self.constexprs else self.types[name])
                for name in fn.arg_names}


def _kernel_fn(name: str):
    return _tgc.kernel(name)


def conv_out(size: Any, kernel: int, stride: int, pad: int, dil: int) -> Any:
    """PyTorch's output length, for an int or a ``tensorrt.plugin.ShapeExpr`` (whose operators
    take the expression on the left)."""
    return (size + (2 * pad - dil * (kernel - 1) - 1)) // stride + 1


def select_spec(dtype: str, c: int, h: int, w: int, mode: int, threshold: float, k: int,
                saliency: int) -> KernelSpec:
    """:func:`select_fused_kernel` for a ``c``-channel ``h x w`` NCHW map of type ``dtype``; the
    gate compiled in. Scalars: ``C, HW, K_MAX``."""
    if dtype not in AOT_CONFIGS:
        raise ValueError(f"unsupported map type {dtype!r}; one of {sorted(AOT_CONFIGS)}")
    cp = 1 << max(0, c - 1).bit_length()
    hw = h * w
    block_hw = max(1, min(1 << max(0, hw - 1).bit_length(), _tgc.SELECT_TILE // cp))
    kk = int(max(0, min(int(k), c))) if mode == _gc.TOPK else 0
    return KernelSpec(
        "select_fused_kernel",
        {"x_ptr": f"*{dtype}", "scale_ptr": "*fp32", "C": "i32", "HW": "i32", "K_MAX": "i32",
         "idx_ptr": "*i32", "cnt_ptr": "*i32"},
        inputs=("x_ptr", "scale_ptr"), scalars=("C", "HW", "K_MAX"),
        outputs=("idx_ptr", "cnt_ptr"),
        constexprs={"k": kk, "threshold": float(threshold), "norm": _tgc._norm(saliency, hw),
                    "MODE": int(mode), "SALIENCY": int(saliency), "LAYOUT": 0, "CP": cp,
                    "BLOCK_HW": block_hw},
        num_warps=8 if cp >= 1024 else _SELECT_WARPS)


def conv_spec(dtype: str, kh: int, kw: int, stride: tuple[int, int], pad: tuple[int, int],
              dil: tuple[int, int], precision: str = "tf32") -> KernelSpec:
    """:func:`gated_conv_kernel` on NCHW maps of type ``dtype``, no residual or activation (the
    graph's own add and ReLU follow it as TensorRT layers). Scalars: ``C, H, W, COUT, HO, WO,
    K_MAX``."""
    if dtype not in AOT_CONFIGS:
        raise ValueError(f"unsupported map type {dtype!r}; one of {sorted(AOT_CONFIGS)}")
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    cfg = AOT_CONFIGS[dtype]
    ptr = f"*{dtype}"
    return KernelSpec(
        "gated_conv_kernel",
        {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "idx_ptr": "*i32", "cnt_ptr": "*i32",
         **{s: "i32" for s in ("C", "H", "W", "COUT", "HO", "WO", "K_MAX")}, "out_ptr": ptr},
        inputs=("x_ptr", "w_ptr", "b_ptr", "idx_ptr", "cnt_ptr"),
        scalars=("C", "H", "W", "COUT", "HO", "WO", "K_MAX"), outputs=("out_ptr",),
        constexprs={"res_ptr": None, "SH": int(stride[0]), "SW": int(stride[1]),
                    "PH": int(pad[0]), "PW": int(pad[1]), "DH": int(dil[0]), "DW": int(dil[1]),
                    "KH": int(kh), "KW": int(kw), "LAYOUT": 0, "HAS_RES": False, "ACT": 0,
                    "PRECISION": precision if dtype == "fp32" else "none", "UPCAST": False,
                    "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compile_spec(spec: KernelSpec, target: Any = None) -> Any:
    """``triton.compile`` of ``spec`` (for ``target``, e.g. ``GPUTarget("cuda", 90, 32)``; None:
    the current GPU), its PTX parameters checked (:func:`check_ptx_params`)."""
    import triton

    src = triton.compiler.ASTSource(fn=_kernel_fn(spec.kernel), signature=spec.signature,
                                    constexprs=dict(spec.constexprs))
    compiled = triton.compile(src, target=target,
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    check_ptx_params(compiled, spec)
    return compiled


def ptx_params(ptx: str, name: str) -> list[str]:
    """The ``.param`` types of kernel ``name``'s entry in ``ptx`` (e.g. ``["u64", "u32"]``)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"no entry {name!r} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def check_ptx_params(compiled: Any, spec: KernelSpec) -> None:
    """Refuse a compiled kernel whose PTX parameters are not what TensorRT will pass: the input
    pointers, the int32 scalars, the output pointers, then only Triton's scratch pointers, with no
    scratch memory needed (TensorRT passes null for those)."""
    md = compiled.metadata
    params = ptx_params(compiled.asm["ptx"], md.name)
    want = ["u64"] * len(spec.inputs) + ["u32"] * len(spec.scalars) + ["u64"] * len(spec.outputs)
    head, tail = params[:len(want)], params[len(want):]
    if head != want or any(p != "u64" for p in tail) or len(tail) > 2:
        raise RuntimeError(f"{spec.kernel}: PTX parameters {params}, expected {want} then at "
                           "most two scratch pointers; the plugin would bind them wrongly")
    for attr in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(md, attr, 0) or 0):
            raise RuntimeError(f"{spec.kernel} needs {attr}={getattr(md, attr)}, which an AOT "
                               "plugin cannot provide")


# --- registration (needs TensorRT >= 10.x with tensorrt.plugin.aot_impl; unverified) ----------

def _const(expr: Any, what: str) -> int:
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise ValueError(f"the AOT gated-conv plugin needs a static {what}")
    return int(expr.constant_value())


def register_aot_plugins() -> bool:
    """Register :data:`SELECT_PLUGIN` and :data:`CONV_PLUGIN` with TensorRT's plugin registry.
    Idempotent; returns whether they are registered (False, with a log line, where TensorRT
    lacks ``tensorrt.plugin.aot_impl`` or triton is missing)."""
    if _state["registered"]:
        return True
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp

        if not hasattr(trtp, "aot_impl") or not _tgc.available():
            raise ImportError("tensorrt.plugin.aot_impl or triton missing")
    except ImportError as exc:
        _LOG.warning("ispc: AOT TensorRT plugins unavailable (%s)", exc)
        return False
    dt_name = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}

    @trtp.register(SELECT_PLUGIN)
    def _select_desc(x: trtp.TensorDesc, scale: trtp.TensorDesc, mode: int, threshold: float,
                     k: int, saliency: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        n, c = x.shape_expr[0], x.shape_expr[1]
        return (trtp.from_shape_expr((n, c), dtype=trt.int32),
                trtp.from_shape_expr((n,), dtype=trt.int32))

    @trtp.autotune(SELECT_PLUGIN)
    def _select_types(x: trtp.TensorDesc, scale: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{t}, FP32, INT32, INT32") for t in
                ("FP32", "FP16", "BF16")]

    @trtp.aot_impl(SELECT_PLUGIN)
    def _select_aot(x: trtp.TensorDesc, scale: trtp.TensorDesc, mode: int, threshold: float,
                    k: int, saliency: int, outputs: tuple[trtp.TensorDesc], tactic: int):
        shp = x.shape_expr
        c, h, w = (_const(shp[i], d) for i, d in ((1, "C"), (2, "H"), (3, "W")))
        spec = select_spec(dt_name[x.dtype], c, h, w, mode, threshold, k, saliency)
        kernel = compile_spec(spec)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = shp[0]
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in (c, h * w, c)])
        return kernel.metadata.name, kernel.asm["ptx"], launch, extra

    @trtp.register(CONV_PLUGIN)
    def _conv_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc,
                   idx: trtp.TensorDesc, cnt: trtp.TensorDesc, kh: int, kw: int, stride_h: int,
                   stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
                   precision: str) -> trtp.TensorDesc:
        shp = x.shape_expr
        return trtp.from_shape_expr(
            (shp[0], w.shape_expr[1], conv_out(shp[2], kh, stride_h, pad_h, dil_h),
             conv_out(shp[3], kw, stride_w, pad_w, dil_w)), dtype=x.dtype)

    @trtp.autotune(CONV_PLUGIN)
    def _conv_types(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc,
                    idx: trtp.TensorDesc, cnt: trtp.TensorDesc,
                    outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{t}, {t}, {t}, INT32, INT32, {t}") for t in
                ("FP32", "FP16", "BF16")]

    @trtp.aot_impl(CONV_PLUGIN)
    def _conv_aot(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc,
                  idx: trtp.TensorDesc, cnt: trtp.TensorDesc, kh: int, kw: int, stride_h: int,
                  stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, precision: str,
                  outputs: tuple[trtp.TensorDesc], tactic: int):
        shp = x.shape_expr
        c, h, wd = (_const(shp[i], d) for i, d in ((1, "C"), (2, "H"), (3, "W")))
        cout = _const(w.shape_expr[1], "Cout")
        ho = conv_out(h, kh, stride_h, pad_h, dil_h)
        wo = conv_out(wd, kw, stride_w, pad_w, dil_w)
        spec = conv_spec(dt_name[x.dtype], kh, kw, (stride_h, stride_w), (pad_h, pad_w),
                         (dil_h, dil_w), precision)
        kernel = compile_spec(spec)
        cfg = AOT_CONFIGS[dt_name[x.dtype]]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = math.ceil(ho * wo / cfg.block_m)
        launch.grid_y = math.ceil(cout / cfg.block_n)
        launch.grid_z = shp[0]
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(v) for v in (c, h, wd, cout, ho, wo, c)])
        return kernel.metadata.name, kernel.asm["ptx"], launch, extra

    _state["registered"] = True
    return True


def _as_tensor(v: Any) -> torch.Tensor:
    import numpy as np

    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    raise BackendUnavailableError("the AOT gated-conv plugin needs the layer's weight, bias and "
                                  "scale as constants (freeze the model's parameters)")


def aot_converter(ctx: Any, target: Any, args: tuple, kwargs: dict, name: str) -> Any:
    """Torch-TensorRT converter for ``torch.ops.ispc.gated_conv2d``: the two AOT plugin layers.
    The weight is packed here (:func:`ispc.ops.triton_gated_conv.pack_weight`), once per
    engine."""
    import tensorrt as trt
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor


    a = dict(zip(_gc.ARG_NAMES, args))
    a.update(kwargs)
    x = a["x"]
    dtype = {trt.float32: torch.float32, trt.float16: torch.float16,
             trt.bfloat16: torch.bfloat16}[x.dtype]
    weight, bias, scale = (_as_tensor(a[n]) for n in ("weight", "bias", "scale"))
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    wp = _tgc.pack_weight(weight, dtype)
    consts = [get_trt_tensor(ctx, v, f"{name}_{what}") for v, what in (
        (wp, "wpacked"), (bias.to(dtype), "bias"), (scale.to(torch.float32), "scale"))]
    sel = ctx.net.add_plugin(trtp.op.ispc.select_channels(
        x, consts[2], mode=int(a["mode"]), threshold=float(a["threshold"]), k=int(a["k"]),
        saliency=int(a["saliency"])), aot=True)
    sel.name = f"{name}_select"
    conv = ctx.net.add_plugin(trtp.op.ispc.gated_conv_indexed(
        x, consts[0], consts[1], sel.get_output(0), sel.get_output(1), kh=kh, kw=kw,
        stride_h=int(a["stride_h"]), stride_w=int(a["stride_w"]), pad_h=int(a["pad_h"]),
        pad_w=int(a["pad_w"]), dil_h=int(a["dil_h"]), dil_w=int(a["dil_w"]),
        precision=_tgc.float32_precision()), aot=True)
    conv.name = f"{name}_conv"
    return conv.get_output(0)
