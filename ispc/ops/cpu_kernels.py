"""Eager CPU kernels that use weights prepared at compile time.

The operator's generic kernels (``gated_conv.py``) receive the weight in PyTorch's layout, so every
call gathers ``Cout x K`` small slices of ``kh*kw`` floats. Here the weight is stored once, at
compile time, as ``W^T`` with shape ``(Cin*kh*kw, Cout)``: the rows of one input channel are
contiguous, so gathering the kept channels copies ``K*kh*kw`` rows of ``Cout`` floats, and the
convolution becomes ``bias + W^T[kept]^T @ im2col(x[kept])`` -- one BLAS call that reads exactly
the kept part of the weight. It pays most where weights outweigh activations (deep layers with
small feature maps, and 1x1 convolutions, which need no im2col at all).

Strategies (``GatedConv2d.strategy``): ``"gather"`` (per instance: index_select + oneDNN conv;
with the native library, its selection and gathers run in C: :func:`gated_conv2d_gather_native`),
``"grouped"`` (whole batch: gather + one grouped conv with groups=N; per-instance for N=1),
``"gemm"`` (the above), ``"native"`` (:mod:`ispc.ops.native`: an indirect GEMM in C that reads
the kept channels and their packed weights by index, the whole batch in one call; float32 only,
present where a C compiler is) and ``"nhwc"`` (:class:`ispc.ops.native.NhwcConv`: the same on
channels-last maps, read in place, output channels in the vector lanes, output channels-last; on
NCHW inputs it runs ``gather``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .gated_conv import (SALIENCY_L1, SALIENCY_L2, THRESHOLD, TOPK, bias_only,
                         bucket_width, channel_saliency, conv_out_size, gated_conv2d_grouped,
                         gated_conv2d_loop, kept_all)

__all__ = ["STRATEGIES", "available_strategies", "prepare_weight", "kept_indices", "im2col",
           "gated_conv2d_gemm", "gated_conv2d_native", "gated_conv2d_gather_native",
           "gated_conv2d_nhwc", "nhwc_serves", "run_strategy", "NATIVE_STRATEGIES"]

STRATEGIES = ("gather", "grouped", "gemm", "native", "nhwc")
#: the strategies that need the compiled native library
NATIVE_STRATEGIES = ("native", "nhwc")


def available_strategies() -> tuple[str, ...]:
    """The strategies this machine can run (``native`` and ``nhwc`` need the compiled kernel)."""
    return STRATEGIES if native.available() else tuple(
        s for s in STRATEGIES if s not in NATIVE_STRATEGIES)


def nhwc_serves(x: Tensor) -> bool:
    """Whether :class:`~ispc.ops.native.NhwcConv` reads ``x`` as it is: a channels-last float32 CPU
    map (an NCHW map would need a layout copy per call: those run ``gather``)."""
    return (x.dtype == torch.float32 and x.dim() == 4 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last))


def gated_conv2d_nhwc(x: Tensor, layer: native.NhwcConv, scale: Tensor, mode: int,
                      threshold: float, k: int, saliency: int) -> Tensor:
    """The whole batch in one call of the channels-last kernel (saliency, selection and the
    convolution in C; ``layer`` holds the packed weights and the bias); every channel kept: its
    dense mode. ``x`` channels-last float32 (:func:`nhwc_serves`); the output is channels-last."""
    if kept_all(mode, threshold, k, x.shape[1]):
        return layer(x, native.DENSE)
    if saliency not in (SALIENCY_L1, SALIENCY_L2):
        raise ValueError(f"unknown saliency code {saliency}")
    return layer(x, mode, scale=scale.to(torch.float32).contiguous(), threshold=threshold, k=k,
                 saliency=saliency)


def prepare_weight(weight: Tensor) -> Tensor:
    """``W^T``: (Cin*kh*kw, Cout), contiguous, rows grouped by input channel."""
    cout = weight.shape[0]
    return weight.detach().reshape(cout, -1).t().contiguous()


def kept_indices(s_row: Tensor, mode: int, threshold: float, k: int) -> Tensor:
    """Sorted indices of the channels one instance keeps."""
    if mode == TOPK:
        return torch.topk(s_row, k, sorted=False).indices.sort().values
    return torch.nonzero(s_row >= threshold).flatten()


def im2col(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int]) -> Tensor:
    """``F.unfold`` of one instance ``(C, H, W)`` -> ``(C*kh*kw, Ho*Wo)``, as one strided copy.

    A zero-padded copy viewed through ``as_strided`` and made contiguous: 1.1-7x faster than
    ``F.unfold`` on ResNet-sized layers (PyTorch 2.13, 2-core CPU, ``benchmarks/kernel_speed.py``),
    which would otherwise cost as much as the skipped MACs save on large feature maps.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    c, h, w = x.shape
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    hp, wp = h + 2 * ph, w + 2 * pw
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    view = x.as_strided((c, kh, kw, ho, wo), (hp * wp, dh * wp, dw, sh * wp, sw))
    return view.reshape(c * kh * kw, ho * wo)


def gated_conv2d_gemm(x: Tensor, weight: Tensor, weight_t: Tensor, bias: Tensor, scale: Tensor,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      mode: int, threshold: float, k: int, saliency: int) -> Tensor:
    """Per instance: gather kept rows of ``W^T`` and of the im2col matrix, one ``addmm``."""
    n, c, h, w = x.shape
    if kept_all(mode, threshold, k, c):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    cout, _, kh, kw = weight.shape
    ho = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    taps = kh * kw
    pointwise = taps == 1 and padding == (0, 0)
    s = channel_saliency(x, scale, saliency)
    out = x.new_empty((n, cout, ho * wo))
    w_rows = weight_t.view(c, taps * cout)  # one row per input channel: its taps' rows of W^T
    b = bias[:, None]
    for i in range(n):
        idx = kept_indices(s[i], mode, threshold, k) if (mode == THRESHOLD or k > 0) else s.new_zeros(
            0, dtype=torch.long)
        if idx.numel() == 0:
            out[i] = b
            continue
        xi = x[i].index_select(0, idx)
        if pointwise:
            if stride != (1, 1):
                xi = xi[:, ::stride[0], ::stride[1]]
            cols = xi.reshape(idx.numel(), ho * wo)
        else:
            cols = im2col(xi, (kh, kw), stride, padding, dilation)
        w_kept = w_rows.index_select(0, idx).view(-1, cout)
        torch.addmm(b, w_kept.t(), cols, out=out[i])
    return out.view(n, cout, ho, wo)


def gated_conv2d_native(x: Tensor, weight: Tensor, layer: native.NativeLayer, bias: Tensor,
                        scale: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                        dilation: tuple[int, int], mode: int, threshold: float, k: int,
                        saliency: int) -> Tensor:
    """The whole batch in one call of the native kernel, selection included (``layer`` holds the
    packed weights and bias; ``weight``/``bias`` serve the all-kept case, the dense convolution)."""
    c = x.shape[1]
    if kept_all(mode, threshold, k, c):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    if saliency not in (SALIENCY_L1, SALIENCY_L2):
        raise ValueError(f"unknown saliency code {saliency}")
    # saliency and selection run inside the kernel too: one C call per layer
    return layer.gated(x.contiguous(), scale.to(torch.float32).contiguous(), mode, threshold, k,
                       saliency)


def gated_conv2d_gather_native(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor,
                               stride: tuple[int, int], padding: tuple[int, int],
                               dilation: tuple[int, int], mode: int, threshold: float, k: int,
                               saliency: int) -> Tensor:
    """The ``gather`` strategy (per instance: the kept channels and their weights gathered, oneDNN's
    convolution on them) with its saliency, selection and gathers in C (:func:`native.select`,
    :func:`native.gather`): one multithreaded pass each, where PyTorch's norm, top-k, sort and
    ``index_select`` cost VGG-16's 56x56-224x224 layers 1.4-2.8 ms at batch 1 (2-core Xeon; this
    path: 2-19% faster per layer, ``benchmarks/kernel_speed.py --gather``). ``x`` float32, contiguous or
    channels-last (then the output is channels-last too). Threshold mode pads each instance's
    width with zero inputs (``bucket_width``), as :func:`gated_conv2d_loop` does. The batched
    ``grouped`` kernel keeps its PyTorch gathers: the same change measured within noise at batch 8."""
    n, c = x.shape[:2]
    if kept_all(mode, threshold, k, c):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    if saliency not in (SALIENCY_L1, SALIENCY_L2):
        raise ValueError(f"unknown saliency code {saliency}")
    idx, counts = native.select(x, scale.to(torch.float32).contiguous(), mode, threshold, k, saliency)
    w = weight.contiguous()
    outs = []
    for i in range(n):
        kept = int(counts[i])
        if kept == 0:
            outs.append(bias_only(x, weight, bias, stride, padding, dilation, 1))
            continue
        width = kept if mode == TOPK else bucket_width(kept, c)
        xs = native.gather(x[i:i + 1], idx[i:i + 1], width, counts[i:i + 1])
        outs.append(F.conv2d(xs, native.gather(w, idx[i], width), bias, stride, padding, dilation))
    # a channels-last input gives channels-last outputs (oneDNN's NHWC convolution; the gathers
    # keep the layout), so the maps a channels-last model passes between layers stay so
    fmt = torch.channels_last if native.is_channels_last(x) else torch.contiguous_format
    return outs[0].contiguous(memory_format=fmt) if n == 1 else torch.cat(outs).contiguous(
        memory_format=fmt)


def run_strategy(strategy: str, x: Tensor, weight: Tensor, weight_t, bias: Tensor,
                 scale: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], mode: int, threshold: float, k: int,
                 saliency: int) -> Tensor:
    """Run one named strategy (all compute the operator's semantics).

    ``weight_t`` is the strategy's prepared weight: ``W^T`` for ``gemm``, a
    :class:`~ispc.ops.native.NativeLayer` for ``native``, a :class:`~ispc.ops.native.NhwcConv` for
    ``nhwc``; None falls back to the per-instance gather kernel (so do ``native`` for dtypes other
    than float32 and ``nhwc`` for inputs it does not read in place, :func:`nhwc_serves`).
    """
    if strategy == "nhwc":
        if isinstance(weight_t, native.NhwcConv) and nhwc_serves(x):
            return gated_conv2d_nhwc(x, weight_t, scale, mode, threshold, k, saliency)
        strategy = "gather"
    if strategy == "native" and weight_t is not None and x.dtype == torch.float32:
        return gated_conv2d_native(x, weight, weight_t, bias, scale, stride, padding, dilation,
                                   mode, threshold, k, saliency)
    if strategy == "gemm" and weight_t is not None:
        return gated_conv2d_gemm(x, weight, weight_t, bias, scale, stride, padding, dilation, mode,
                                 threshold, k, saliency)
    if (strategy == "gather" or (strategy == "grouped" and x.shape[0] == 1)) and (
            x.dtype == weight.dtype == torch.float32 and native.available()):
        if not (x.is_contiguous() or native.is_channels_last(x)):
            x = x.contiguous()
        return gated_conv2d_gather_native(x, weight, bias, scale, stride, padding,
                                          dilation, mode, threshold, k, saliency)
    if strategy == "grouped" and x.shape[0] > 1:
        return gated_conv2d_grouped(x, weight, bias, scale, stride[0], stride[1], padding[0],
                                    padding[1], dilation[0], dilation[1], mode, threshold, k, saliency)
    return gated_conv2d_loop(x, weight, bias, scale, stride[0], stride[1], padding[0], padding[1],
                             dilation[0], dilation[1], mode, threshold, k, saliency)
