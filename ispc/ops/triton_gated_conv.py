"""The CUDA kernel of ``torch.ops.ispc.gated_conv2d``, written in Triton.

An implicit-GEMM convolution (output pixels x output channels per program, the reduction over
input channels x kernel positions) whose reduction loop visits only each instance's kept input
channels: the gating result is passed as an index tensor ``idx[N, K]`` (kept channels first, in
ascending order) and a count per instance ``cnt[N]``, so a batch whose instances keep different
channels, and different numbers of them (threshold mode), runs in one launch with no host
synchronisation. Work per instance is proportional to its kept channels.

Registration: :func:`register_cuda_kernel` (called when :mod:`ispc.ops` is imported) registers
:func:`gated_conv2d_triton` as the ``"cuda"`` kernel of the operator if the ``triton`` package is
installed; triton itself is imported only when the kernel first runs, so ``import ispc`` neither
needs nor loads triton. ``ISPC_TRITON=0`` in the environment (or :func:`set_enabled(False)`)
routes CUDA tensors back to the generic PyTorch kernels. All-channels-kept layers use cuDNN.

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before triton is first imported,
:func:`gated_conv2d_indexed` and :func:`gated_conv2d_triton` run on CPU tensors in Triton's
interpreter (slow: keep shapes small; the tests use a subprocess so the setting stays isolated).

Precision: float32 inputs use ``tl.dot(..., input_precision="ieee")`` (no TF32), accumulating in
float32, so results match the masked-dense reference to float32 rounding; float16/bfloat16 use
the tensor-core dot with float32 accumulation.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gated_conv as _gc

__all__ = ["available", "gated_conv2d_indexed", "gated_conv2d_triton", "kept_indices",
           "register_cuda_kernel", "set_enabled", "enabled", "BLOCKS"]

#: (BLOCK_M output pixels, BLOCK_N output channels, BLOCK_C input channels) per program
BLOCKS = (64, 64, 32)
_INTERPRET_BLOCKS = (16, 16, 16)  # tl.dot needs >= 16; small blocks keep the interpreter quick
_state = {"enabled": os.environ.get("ISPC_TRITON", "1") != "0", "registered": False}


def available() -> bool:
    """Whether the triton package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def enabled() -> bool:
    return bool(_state["enabled"])


def set_enabled(flag: bool) -> None:
    """Use (True) or bypass (False) the Triton kernel for CUDA tensors."""
    _state["enabled"] = bool(flag)


def kept_indices(x: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
                 saliency: int = _gc.SALIENCY_L2) -> tuple[Tensor, Tensor]:
    """``(idx[N, K] int32, cnt[N] int32)``: each instance's kept channels first, ascending.

    topk: ``K = k``, every count ``k``. threshold: ``K = C`` (no host sync to find the widest
    row); entries past ``cnt[n]`` are never read by the kernel.
    """
    n, c = x.shape[0], x.shape[1]
    if _gc._kept_all(mode, threshold, k, c):
        idx = torch.arange(c, device=x.device, dtype=torch.int32).expand(n, c).contiguous()
        return idx, torch.full((n,), c, device=x.device, dtype=torch.int32)
    s = _gc.channel_saliency(x, scale, saliency)
    if mode == _gc.TOPK:
        kk = max(0, min(int(k), c))
        if kk == 0:
            return (torch.zeros((n, 0), device=x.device, dtype=torch.int32),
                    torch.zeros((n,), device=x.device, dtype=torch.int32))
        idx = torch.topk(s, kk, dim=1, sorted=False).indices.sort(dim=1).values
        return idx.to(torch.int32).contiguous(), torch.full((n,), kk, device=x.device,
                                                            dtype=torch.int32)
    if mode != _gc.THRESHOLD:
        raise ValueError(f"unknown gating mode {mode}")
    kept = s >= threshold
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), kept.sum(dim=1).to(torch.int32)


def gated_conv2d_indexed(x: Tensor, weight: Tensor, bias: Tensor, idx: Tensor, cnt: Tensor,
                         stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                         dilation: tuple[int, int] = (1, 1), *,
                         blocks: tuple[int, int, int] | None = None) -> Tensor:
    """Launch the Triton kernel: for each instance ``n``, with ``j = idx[n, :cnt[n]]``,
    ``out[n] = conv2d(x[n, j], weight[:, j]) + bias``.

    Works on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``.
    """
    from . import _triton_kernels as tk

    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("gated_conv2d_indexed needs a 4-d input and weight")
    if not (x.is_cuda or tk.interpreting()):
        raise RuntimeError("the Triton gated conv runs on CUDA tensors (or on CPU with "
                           "TRITON_INTERPRET=1)")
    x = x.contiguous()
    weight = weight.contiguous().to(x.dtype)
    bias = bias.contiguous().to(x.dtype)
    n, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != c:
        raise ValueError(f"weight has {cin} input channels, input has {c} (groups=1 only)")
    ho = _gc.conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _gc.conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    out = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    idx = idx.to(device=x.device, dtype=torch.int32).contiguous()
    cnt = cnt.to(device=x.device, dtype=torch.int32).contiguous()
    if idx.shape[0] != n or cnt.shape != (n,):
        raise ValueError(f"idx must be [N, K] and cnt [N] with N={n}, got {tuple(idx.shape)}, "
                         f"{tuple(cnt.shape)}")
    bm, bn, bc = blocks or (_INTERPRET_BLOCKS if tk.interpreting() else BLOCKS)
    grid = (tk.cdiv(ho * wo, bm), tk.cdiv(cout, bn), n)
    kernel = tk.jitted_kernel()
    k_max = max(int(idx.shape[1]), 1)
    if idx.shape[1] == 0:  # nothing kept anywhere: counts are 0, the pointer is never read
        idx = torch.zeros((n, 1), device=x.device, dtype=torch.int32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](x, weight, bias, idx, cnt, out, c, h, w, cout, ho, wo, k_max,
                     stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                     KH=kh, KW=kw, IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_C=bc)
    return out


def gated_conv2d_triton(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                        stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                        threshold: float, k: int, saliency: int = _gc.SALIENCY_L2) -> Tensor:
    """The operator's semantics (see :mod:`ispc.ops.gated_conv`) with the Triton kernel."""
    stride, pad, dil = (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w)
    if _gc._kept_all(mode, threshold, k, x.shape[1]):
        return F.conv2d(x, weight, bias, stride, pad, dil)
    idx, cnt = kept_indices(x, scale, mode, threshold, k, saliency)
    return gated_conv2d_indexed(x, weight, bias, idx, cnt, stride, pad, dil)


def _cuda_kernel(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode,
                 threshold, k, saliency):
    impl = gated_conv2d_triton if _state["enabled"] else _gc.gated_conv2d_fast
    return impl(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode,
                threshold, k, saliency)


def register_cuda_kernel() -> bool:
    """Register the Triton kernel for CUDA tensors if triton is installed. Idempotent.

    Returns whether it is registered. Never imports triton.
    """
    if _state["registered"]:
        return True
    if not available():
        return False
    _gc.gated_conv2d.register_kernel("cuda")(_cuda_kernel)
    _state["registered"] = True
    return True
