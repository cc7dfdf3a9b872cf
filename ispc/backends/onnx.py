"""ONNX export of compiled models: ``ispc::gated_conv2d`` lowered to standard ONNX operators.

Exporter: the torch.export-based exporter, ``torch.onnx.export(exported_program, dynamo=True,
custom_translation_table={torch.ops.ispc.gated_conv2d.default: ...})``, with the translation
written in ONNX Script. (The TorchScript-based exporter and ``register_custom_op_symbolic`` are
deprecated in PyTorch 2.13 and cannot see a ``torch.library.custom_op`` through torch.export.)
Needs ``onnx``, ``onnxscript`` and, to run the model, ``onnxruntime`` (``pip install ispc[onnx]``).

How one gated layer is lowered (``x``: N x C x H x W):

1. Saliency ``s[n, c]``: ``ReduceL2(x, axes=[2, 3]) * (1 / sqrt(H * W))`` (``"l2"``; the RMS over
   positions) or ``ReduceMean(Abs(x))`` (``"l1"``), in float32, times the per-channel ``scale``.
2. Which channels each instance keeps:

   - ``topk``: ``TopK(s, k)`` indices per instance, then one of two formulations:

     * **gathered** (static batch only; really skips channels): ``GatherElements`` of the kept
       input channels of every instance -> N x k x H x W, ``Gather`` of the matching weight
       columns -> (N * Cout) x k x kh x kw (a *runtime* weight), one ``Conv`` with
       ``group=N`` over the batch folded into channels, reshaped back to N x Cout x Ho x Wo. The
       Conv's ``group`` attribute is a constant, so the batch size is fixed at export time.
       For N = 1 it is a plain Conv over the k gathered channels: a k/C share of the MACs.
     * **masked** (dynamic batch): a 0/1 mask from ``ScatterElements`` of the TopK indices,
       ``Mul`` onto ``x``, then the dense ``Conv``. Exact, any batch size, but runs the dense
       MACs: no faster than the original model.

   - ``threshold``: the number of kept channels varies per instance, which ONNX Conv cannot
     express without a data-dependent channel count, so it is always **masked**:
     ``mask = s >= threshold``, ``Mul``, dense ``Conv`` (exact, dynamic batch, not faster).

``formulation="auto"`` picks *gathered* for topk layers when the batch is static
(``dynamic_batch=False``) and *masked* otherwise. Both run on ONNX Runtime's CPU provider and are
tested against eager PyTorch there.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..compiled import CompiledModel
from ..errors import BackendUnavailableError
from ..export import as_example_inputs, export_program
from ..ops import gated_conv as _gc

__all__ = ["export_onnx", "onnx_translation", "FORMULATIONS", "MIN_OPSET", "require_onnx"]

FORMULATIONS = ("auto", "gathered", "masked")
MIN_OPSET = 18  #: ReduceL2/ReduceMean with ``axes`` as an input


def require_onnx() -> Any:
    """Import onnxscript (and onnx) or raise :class:`BackendUnavailableError` with a hint."""
    try:
        import onnx  # noqa: F401
        import onnxscript
    except ImportError as exc:
        raise BackendUnavailableError(
            f"ONNX export needs the onnx and onnxscript packages ({exc}); "
            "install them with `pip install ispc[onnx]` (onnx, onnxscript, onnxruntime)") from None
    return onnxscript


def _default_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_DEFAULT_OPSET
    except ImportError:  # pragma: no cover - layout of older/newer torch
        ONNX_DEFAULT_OPSET = MIN_OPSET
    return max(int(ONNX_DEFAULT_OPSET), MIN_OPSET)


def onnx_translation(opset: int, *, formulation: str = "masked",
                     static_batch: int | None = None) -> Callable:
    """The ONNX Script translation of ``ispc::gated_conv2d`` (for ``custom_translation_table``).

    ``formulation``: ``"gathered"`` (needs ``static_batch``) or ``"masked"``; threshold-mode layers
    are always masked. See the module docstring.
    """
    onnxscript = require_onnx()
    if formulation not in ("gathered", "masked"):
        raise ValueError(f"formulation must be 'gathered' or 'masked', got {formulation!r}")
    if formulation == "gathered" and not static_batch:
        raise ValueError("the gathered formulation needs a static batch size (Conv group=N)")
    op = getattr(onnxscript, f"opset{opset}")
    FLOAT = 1  # onnx.TensorProto.FLOAT

    def ints(values: list[int]):
        return op.Constant(value_ints=[int(v) for v in values])

    def saliency_of(x, scale, saliency: int):
        xf = op.Cast(x, to=FLOAT)
        axes = ints([2, 3])
        if saliency == _gc.SALIENCY_L2:
            h, w = x.shape[2], x.shape[3]
            s = op.ReduceL2(xf, axes, keepdims=0)
            if isinstance(h, int) and isinstance(w, int):
                inv = op.Constant(value_float=float(torch.tensor(1.0 / math.sqrt(max(h * w, 1)))))
            else:  # symbolic spatial size: compute 1/sqrt(H*W) at run time
                hw = op.Cast(op.ReduceProd(op.Shape(x, start=2), keepdims=0), to=FLOAT)
                inv = op.Reciprocal(op.Sqrt(op.Max(hw, op.Constant(value_float=1.0))))
            s = op.Mul(s, inv)
        elif saliency == _gc.SALIENCY_L1:
            s = op.ReduceMean(op.Abs(xf), axes, keepdims=0)
        else:
            raise ValueError(f"unknown saliency code {saliency}")
        return op.Mul(s, op.Cast(scale, to=FLOAT))

    def conv(x, weight, bias, stride, pad, dil, group: int = 1):
        return op.Conv(x, weight, bias, strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]],
                       dilations=list(dil), group=group)

    def masked(x, mask_f, weight, bias, stride, pad, dil):
        m = op.CastLike(op.Unsqueeze(mask_f, ints([2, 3])), x)
        return conv(op.Mul(x, m), weight, bias, stride, pad, dil)

    def gated_conv2d(x, weight, bias, scale, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                     dil_h: int, dil_w: int, mode: int, threshold: float, k: int, saliency: int):
        stride, pad, dil = (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w)
        channels = int(weight.shape[1])
        if _gc.kept_all(mode, threshold, k, channels):
            return conv(x, weight, bias, stride, pad, dil)
        s = saliency_of(x, scale, saliency)
        if mode == _gc.THRESHOLD:
            thr = op.Constant(value_float=float(threshold))
            keep = op.Cast(op.GreaterOrEqual(s, thr), to=FLOAT)
            return masked(x, keep, weight, bias, stride, pad, dil)
        if mode != _gc.TOPK:
            raise ValueError(f"unknown gating mode {mode}")
        if k <= 0:  # nothing kept: the output is the bias everywhere
            none = op.Mul(s, op.Constant(value_float=0.0))
            return masked(x, none, weight, bias, stride, pad, dil)
        _, idx = op.TopK(s, ints([k]), axis=1, largest=1, sorted=1)
        if formulation == "masked":
            zeros = op.Expand(op.Constant(value_float=0.0), op.Shape(s))
            ones = op.Expand(op.Constant(value_float=1.0), op.Shape(idx))
            return masked(x, op.ScatterElements(zeros, idx, ones, axis=1), weight, bias, stride,
                          pad, dil)
        cout, _, kh, kw = (int(d) for d in weight.shape)
        n = int(static_batch)
        if n == 1:
            flat = op.Reshape(idx, ints([k]))
            return conv(op.Gather(x, flat, axis=1), op.Gather(weight, flat, axis=1), bias, stride,
                        pad, dil)
        # batch folded into channels: one grouped conv, group n = one instance
        gshape = op.Concat(op.Shape(idx), op.Shape(x, start=2), axis=0)
        xg = op.GatherElements(x, op.Expand(op.Unsqueeze(idx, ints([2, 3])), gshape), axis=1)
        xg = op.Reshape(xg, ints([1, n * k, 0, 0]))
        wg = op.Transpose(op.Gather(weight, idx, axis=1), perm=[1, 0, 2, 3, 4])
        wg = op.Reshape(wg, ints([n * cout, k, kh, kw]))
        y = conv(xg, wg, op.Tile(bias, ints([n])), stride, pad, dil, group=n)
        return op.Reshape(y, ints([n, cout, 0, 0]))

    return gated_conv2d


def export_onnx(compiled: CompiledModel | torch.nn.Module, path: str | Path, example_inputs: Any,
                *, dynamic_batch: bool = True, opset: int | None = None,
                formulation: str = "auto", optimize: bool = True) -> Any:
    """Export a compiled model to an ONNX file that ONNX Runtime can run.

    Args:
        compiled: an :class:`ispc.CompiledModel` (or any module; gated layers are lowered).
        path: the ``.onnx`` file to write (weights embedded).
        example_inputs: one Tensor or a tuple of positional inputs.
        dynamic_batch: leave the batch dimension symbolic (input/output dim 0 named ``batch``).
        opset: ONNX opset (default: the exporter's default, at least 18).
        formulation: how topk layers are lowered: ``"gathered"`` (real channel skipping, static
            batch), ``"masked"`` (dense Conv of the masked input, any batch) or ``"auto"``
            (gathered when ``dynamic_batch=False``). Threshold layers are always masked.
        optimize: run the exporter's ONNX graph optimizations.

    Returns:
        the :class:`torch.onnx.ONNXProgram` (``.model_proto`` is the ONNX model).
    """
    require_onnx()
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    opset = _default_opset() if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"ispc's ONNX lowering needs opset >= {MIN_OPSET}, got {opset}")
    if formulation == "auto":
        formulation = "masked" if dynamic_batch else "gathered"
    if formulation == "gathered" and dynamic_batch:
        raise ValueError("formulation='gathered' needs a static batch (ONNX Conv's group is a "
                         "constant); pass dynamic_batch=False or formulation='masked'")
    args = as_example_inputs(example_inputs)
    ep = export_program(compiled, args, dynamic_batch=dynamic_batch)
    batch = None if dynamic_batch else int(args[0].shape[0])
    table = {torch.ops.ispc.gated_conv2d.default:
             onnx_translation(opset, formulation=formulation, static_batch=batch)}
    return torch.onnx.export(ep, args, str(path), dynamo=True, custom_translation_table=table,
                             opset_version=opset, optimize=optimize, external_data=False)
