"""Eager CPU kernels of the gated linear layer (:class:`ispc.modules.GatedLinear`).

A linear layer over the last dimension of an ``N x ... x C`` input (ConvNeXt's pointwise layers
on ``N x H x W x C`` maps, the MLPs of Swin and ViT on ``N x T x C`` tokens) is the 1x1
convolution of that input seen as a channels-last ``N x C x P x 1`` map (:func:`as_map`: a view,
no copy). Gating it is gating that convolution: channel ``c`` of instance ``n`` is kept by its
saliency over the ``P`` positions or tokens, and the layer computes
``linear(x * m[n, None, ..., :])``, the operator ``torch.ops.ispc.gated_conv2d`` of the view
(exported, compiled and ONNX graphs hold exactly that). Here are the eager kernels, one function,
:func:`run`, per call:

- ``gemm``: saliency and selection in C on the channels-last view (:func:`ispc.ops.native.select`),
  each instance's kept channels gathered (:func:`ispc.ops.native.gather`, ``N x P x K``), one BLAS
  call on the kept rows of ``W^T`` (``C x O``, prepared once). Without the native library the
  selection runs in PyTorch.
- ``native``: the NCHW indirect-GEMM kernel (:class:`ispc.ops.native.NativeLayer`, 1x1) on a
  transposed copy of the input; it reads the kept channels' packed weights in place, which wins
  where weights outweigh the tokens (ViT's and ConvNeXt's late layers: a few hundred positions).
- ``nhwc``: the channels-last native convolution (``native.NhwcConv``, ``ispc_conv_nhwc``) whose
  1x1 case is this layer: the input view read in place, the output written as ``N x ... x O``.
  It is used where this build of :mod:`ispc.ops.native` has it (:func:`nhwc_available`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .cpu_kernels import kept_indices
from .gated_conv import TOPK, channel_saliency, kept_all

__all__ = ["STRATEGIES", "as_map", "from_map", "nhwc_available", "prepare", "run",
           "gated_linear_reference"]

#: the gated linear layer's eager kernels (``GatedLinear.strategy``); ``gather`` and ``grouped``
#: (names a convolution's archive entry may carry) run as ``gemm``
STRATEGIES = ("gemm", "native", "nhwc")


def as_map(x: Tensor) -> Tensor:
    """``x`` (N x ... x C) as the channels-last ``N x C x P x 1`` map it is (a view when ``x`` is
    contiguous; ``P`` the product of the middle dimensions)."""
    return x.reshape(x.shape[0], -1, 1, x.shape[-1]).permute(0, 3, 1, 2)


def from_map(y: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A ``N x O x P x 1`` result as ``N x ... x O`` (``shape``: the input's)."""
    return y.permute(0, 2, 3, 1).reshape(*shape[:-1], y.shape[1])


def nhwc_available() -> bool:
    """Whether the channels-last native convolution is part of this build."""
    return hasattr(native, "NhwcConv") and native.available()


def gated_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor) -> Tensor:
    """The masked-dense form: ``linear(x * m[n, None, ..., :])`` (``mask``: N x C, bool)."""
    m = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1]).to(x.dtype)
    return F.linear(x * m, weight.reshape(weight.shape[0], -1), bias)


def prepare(strategy: str, weight: Tensor, bias: Tensor, orient: int | None = None,
            positions: int | None = None):
    """The prepared weights of ``strategy`` for a layer of ``weight`` (O x C or O x C x 1 x 1):
    ``W^T`` (gemm), a :class:`~ispc.ops.native.NativeLayer` (native) or a ``NhwcConv`` (nhwc,
    its register tile chosen for ``positions`` rows)."""
    w4 = weight.detach().reshape(weight.shape[0], -1, 1, 1)
    if strategy == "gemm":
        return w4.reshape(w4.shape[0], -1).t().contiguous()
    if strategy == "native":
        return native.NativeLayer(w4, bias, (1, 1), (0, 0), (1, 1),
                                  native.ORIENT_PIX if orient is None else orient)
    if strategy == "nhwc":
        return native.NhwcConv(w4.float().contiguous(), bias, out_hw=positions)
    raise ValueError(f"unknown gated linear strategy {strategy!r}; one of {STRATEGIES}")


def _gemm(x: Tensor, wt: Tensor, bias: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
          saliency: int) -> Tensor:
    n, c, o = x.shape[0], x.shape[-1], wt.shape[1]
    rows = x.reshape(n, -1, c)
    p = rows.shape[1]
    result = x.new_empty((*x.shape[:-1], o))
    out = result.view(n, p, o)
    if native.available() and x.dtype == torch.float32:
        xm = rows.unsqueeze(2).permute(0, 3, 1, 2)  # channels-last N x C x P x 1, a view
        idx, counts = native.select(xm, scale, mode, threshold, k, saliency)
        width = k if mode == TOPK else int(counts.max())
        if width > 0:
            # N x width x P x 1, channels-last: N x P x width in memory
            xg = native.gather(xm, idx, width, counts).permute(0, 2, 3, 1).reshape(n, p, width)
        for i in range(n):
            kept = int(counts[i])
            if kept == 0:
                out[i] = bias
                continue
            torch.addmm(bias, xg[i, :, :kept], wt.index_select(0, idx[i, :kept]), out=out[i])
        return result
    s = channel_saliency(as_map(rows), scale, saliency)
    for i in range(n):
        idx = kept_indices(s[i], mode, threshold, k) if (mode != TOPK or k > 0) else \
            s.new_zeros(0, dtype=torch.long)
        if idx.numel() == 0:
            out[i] = bias
            continue
        torch.addmm(bias, rows[i].index_select(1, idx), wt.index_select(0, idx), out=out[i])
    return result


def run(strategy: str, x: Tensor, weight: Tensor, prepared, bias: Tensor, scale: Tensor, mode: int,
        threshold: float, k: int, saliency: int, residual: Tensor | None = None,
        clamp: tuple[float, float] | None = None) -> tuple[Tensor, bool]:
    """The gated linear layer on ``x`` (N x ... x C, a plain CPU tensor) by ``strategy`` with its
    ``prepared`` weights (:func:`prepare`; None: computed here). Returns the output
    (N x ... x O) and whether ``residual`` and ``clamp`` (the fused epilogue) were applied
    already (only the nhwc kernel applies them itself)."""
    c = x.shape[-1]
    if kept_all(mode, threshold, k, c):
        return F.linear(x, weight.reshape(weight.shape[0], -1), bias), False
    if not x.is_contiguous():
        x = x.contiguous()
    if strategy == "nhwc" and prepared is not None and x.dtype == torch.float32:
        return _nhwc(x, prepared, scale, mode, threshold, k, saliency, residual, clamp)
    if strategy == "native" and prepared is not None and x.dtype == torch.float32:
        xm = as_map(x).contiguous()  # NCHW N x C x P x 1: the kernel's layout
        y = prepared.gated(xm, scale, mode, threshold, k, saliency)
        # contiguous, as nn.Linear returns it: the map's channel-major view made elementwise ops
        # after it (ConvNeXt's GELU) 2.6x slower and the next layer copy it anyway
        return from_map(y, x.shape).contiguous(), False
    wt = prepared if strategy == "gemm" and prepared is not None else prepare("gemm", weight, bias)
    return _gemm(x, wt, bias, scale, mode, threshold, k, saliency), False


def _nhwc(x: Tensor, layer, scale: Tensor, mode: int, threshold: float, k: int, saliency: int,
          residual: Tensor | None, clamp: tuple[float, float] | None) -> tuple[Tensor, bool]:
    """The channels-last native kernel: the input's map view read in place, the output's
    ``N x O x P x 1`` channels-last result is ``N x ... x O`` in memory (no copy either way)."""
    xm = as_map(x)
    fuse = residual is None or (residual.dtype == torch.float32
                                and residual.shape[:-1] == x.shape[:-1])
    r = as_map(residual.contiguous()) if fuse and residual is not None else None
    y = layer(xm, mode, scale=scale, threshold=threshold, k=k, saliency=saliency, residual=r,
              clamp=clamp if fuse and clamp is not None else native.NO_CLAMP)
    out = y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], y.shape[1])
    return out, fuse
