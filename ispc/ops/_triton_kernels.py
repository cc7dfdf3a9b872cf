"""Triton kernels of the gated convolution. Imports triton: load only through
:mod:`ispc.ops.triton_gated_conv`, which does so lazily.

The kernel functions are kept undecorated and wrapped with :func:`triton.jit` on first use.
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) must be chosen before triton is first
imported in the process: the language builtins are set up at import time.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def gated_conv2d_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, out_ptr,
                        C, H, W, COUT, HO, WO, K_MAX,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        KH: tl.constexpr, KW: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Implicit-GEMM convolution of one instance over its kept input channels only.

    Program (pid_m, pid_n, n) computes output pixels ``[pid_m * BLOCK_M, ...)`` x output channels
    ``[pid_n * BLOCK_N, ...)`` of instance ``n``: ``out = bias + sum_j sum_(kh,kw)
    x[n, idx[n, j], ih, iw] * w[co, idx[n, j], kh, kw]`` for ``j < cnt[n]``. The reduction loop
    runs ``ceil(cnt[n] / BLOCK_C)`` times: dropped channels cost nothing. x, w, out are contiguous
    NCHW / OIHW / NCHW; idx is int32 ``[N, K_MAX]``; cnt int32 ``[N]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < HO * WO
    n_ok = offs_n < COUT
    oh = offs_m // WO
    ow = offs_m % WO
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    cnt = tl.load(cnt_ptr + n)
    x_base = x_ptr + n.to(tl.int64) * C * H * W
    w_row = offs_n.to(tl.int64) * C * KH * KW
    idx_base = idx_ptr + n.to(tl.int64) * K_MAX
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # taps outside, kept channels inside: one pipelined loop, whose shared-memory buffers do not
    # grow with the kernel size (unrolled taps inside took 25 pipelines for a 5x5 kernel: 400 KB,
    # over the H200's 227 KB)
    for r in range(0, KH * KW):
        kh = r // KW
        kw = r - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = ih * W + iw
        for c0 in range(0, cnt, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < cnt
            ch = tl.load(idx_base + offs_c, mask=c_ok, other=0).to(tl.int64)
            xt = tl.load(x_base + pix[:, None] + (ch * H * W)[None, :],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_row[None, :] + (ch * KH * KW)[:, None] + r,
                         mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, wt, input_precision="ieee")
            else:
                acc += tl.dot(xt, wt)
    bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    out_base = out_ptr + n.to(tl.int64) * COUT * HO * WO
    out_off = offs_n.to(tl.int64)[None, :] * HO * WO + offs_m[:, None]
    tl.store(out_base + out_off, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_JITTED: dict[bool, object] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jitted_kernel():
    """:func:`gated_conv2d_kernel` wrapped by ``triton.jit`` for the current interpreter setting."""
    key = interpreting()
    if key not in _JITTED:
        _JITTED[key] = triton.jit(gated_conv2d_kernel)
    return _JITTED[key]


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
