"""Triton kernels of the gated convolution. Imports triton: load only through
:mod:`ispc.ops.triton_gated_conv` (or the TensorRT plugin), which do so lazily.

Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) must be chosen before triton is first
imported in the process: ``triton.jit`` reads it when the kernels below are decorated.

Every kernel takes its arguments in the order TensorRT's ahead-of-time plugins launch them with
(``ispc.backends.tensorrt``): input pointers, then 32-bit integer scalars, then output pointers, then
compile-time constants. Float scalars (``threshold``, ``norm``) sit among the scalars: the PyTorch
path passes them at run time, the plugin compiles them in as constants.

Layouts (``LAYOUT``): 0 = contiguous NCHW, 1 = contiguous NHWC (channels-last). The packed weight
is ``w[(c * KH + kh) * KW + kw, co]``: one contiguous row of output channels per input channel and
tap, so a kept channel's weights are read as whole rows (coalesced, whatever channels are kept).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: the smallest int64: the sort key of lanes past the channel count
_KEY_PAD = tl.constexpr(-9223372036854775807 - 1)


@triton.jit
def _select_store(s, offs, C, k, threshold, idx_row, cnt_at, MODE: tl.constexpr,
                  CP: tl.constexpr):
    """Write the kept channels of one instance (ascending) to ``idx_row`` and their count to
    ``cnt_at``. ``s``: its ``CP`` saliencies (lanes >= C are padding).

    topk (MODE 1): the k largest; ties go to the lower channel index. The saliency's bits,
    made monotonic as a signed integer, are the high half of a 64-bit key whose low half is the
    reversed channel index, so keys are unique: one sort finds the k-th largest key, and the kept
    channels are those whose key is not smaller. threshold (MODE 0): ``s >= threshold``.
    """
    ok = offs < C
    if MODE == 1:
        bits = s.to(tl.int32, bitcast=True)
        mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = (mono.to(tl.int64) << 32) | (CP - 1 - offs).to(tl.int64)
        key = tl.where(ok, key, _KEY_PAD)
        ordered = tl.sort(key, descending=True)
        kth = tl.max(tl.where(tl.arange(0, CP) == k - 1, ordered, _KEY_PAD), axis=0)
        # k = 0 keeps nothing (a tensor compare: the interpreter rejects a scalar in a mask)
        kept = ok & (key >= kth) & (tl.full([CP], 0, tl.int32) < k)
    else:
        kept = ok & (s >= threshold)
    pos = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(idx_row + pos, offs, mask=kept)
    tl.store(cnt_at, tl.sum(kept.to(tl.int32), axis=0))


@triton.jit
def _finish_saliency(acc, scale, norm, SALIENCY: tl.constexpr):
    """Sums over positions -> saliency: ``sqrt(sum x^2) * norm * scale`` (l2; ``norm =
    1/sqrt(HW)``) or ``sum |x| * norm * scale`` (l1; ``norm = 1/HW``), as
    :func:`ispc.ops.gated_conv.channel_saliency` computes them."""
    if SALIENCY == 0:
        acc = tl.sqrt(acc)
    return acc * norm * scale


@triton.jit
def select_fused_kernel(x_ptr, scale_ptr, C, HW, K_MAX, k, threshold, norm, idx_ptr, cnt_ptr,
                        MODE: tl.constexpr, SALIENCY: tl.constexpr, LAYOUT: tl.constexpr,
                        CP: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Saliency and selection of one instance per program (grid ``(N,)``): one launch, the
    saliencies never leave registers. For batches wide enough to fill the GPU, and the plugin."""
    n = tl.program_id(0)
    offs_c = tl.arange(0, CP)
    c_ok = offs_c < C
    base = x_ptr + n.to(tl.int64) * C * HW
    acc = tl.zeros([CP], dtype=tl.float32)
    for h0 in range(0, HW, BLOCK_HW):
        offs_h = h0 + tl.arange(0, BLOCK_HW)
        h_ok = offs_h < HW
        if LAYOUT == 0:
            v = tl.load(base + offs_c[:, None] * HW + offs_h[None, :],
                        mask=c_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            if SALIENCY == 0:
                acc += tl.sum(v * v, axis=1)
            else:
                acc += tl.sum(tl.abs(v), axis=1)
        else:
            v = tl.load(base + offs_h[:, None] * C + offs_c[None, :],
                        mask=h_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            if SALIENCY == 0:
                acc += tl.sum(v * v, axis=0)
            else:
                acc += tl.sum(tl.abs(v), axis=0)
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    s = _finish_saliency(acc, scale, norm, SALIENCY)
    _select_store(s, offs_c, C, k, threshold, idx_ptr + n.to(tl.int64) * K_MAX, cnt_ptr + n,
                  MODE, CP)


@triton.jit
def saliency_partial_kernel(x_ptr, C, HW, HW_PER, part_ptr, SALIENCY: tl.constexpr,
                            LAYOUT: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_HW: tl.constexpr):
    """Partial sums (of x^2 or |x|) of ``BLOCK_C`` channels over ``HW_PER`` positions per program
    (grid ``(N, cdiv(C, BLOCK_C), NHB)``) into ``part[n, hb, c]``: the whole GPU works on a small
    batch's saliencies. :func:`select_partials_kernel` adds them up, in a fixed order."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    hb = tl.program_id(2)
    nhb = tl.num_programs(2)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    base = x_ptr + n.to(tl.int64) * C * HW
    h_lo = hb * HW_PER
    h_hi = tl.minimum(HW, h_lo + HW_PER)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for h0 in range(h_lo, h_hi, BLOCK_HW):
        offs_h = h0 + tl.arange(0, BLOCK_HW)
        h_ok = offs_h < h_hi
        if LAYOUT == 0:
            v = tl.load(base + offs_c[:, None] * HW + offs_h[None, :],
                        mask=c_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            if SALIENCY == 0:
                acc += tl.sum(v * v, axis=1)
            else:
                acc += tl.sum(tl.abs(v), axis=1)
        else:
            v = tl.load(base + offs_h[:, None] * C + offs_c[None, :],
                        mask=h_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            if SALIENCY == 0:
                acc += tl.sum(v * v, axis=0)
            else:
                acc += tl.sum(tl.abs(v), axis=0)
    tl.store(part_ptr + (n.to(tl.int64) * nhb + hb) * C + offs_c, acc, mask=c_ok)


@triton.jit
def select_partials_kernel(part_ptr, scale_ptr, C, NHB, K_MAX, k, threshold, norm, idx_ptr,
                           cnt_ptr, MODE: tl.constexpr, SALIENCY: tl.constexpr,
                           CP: tl.constexpr):
    """Selection of one instance per program (grid ``(N,)``) from the partial sums of
    :func:`saliency_partial_kernel`."""
    n = tl.program_id(0)
    offs_c = tl.arange(0, CP)
    c_ok = offs_c < C
    acc = tl.zeros([CP], dtype=tl.float32)
    row = part_ptr + n.to(tl.int64) * NHB * C
    for hb in range(0, NHB):
        acc += tl.load(row + hb * C + offs_c, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    s = _finish_saliency(acc, scale, norm, SALIENCY)
    _select_store(s, offs_c, C, k, threshold, idx_ptr + n.to(tl.int64) * K_MAX, cnt_ptr + n,
                  MODE, CP)


@triton.jit
def gated_conv_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, res_ptr,
                      C, H, W, COUT, HO, WO, K_MAX, SH, SW, PH, PW, DH, DW,
                      out_ptr,
                      KH: tl.constexpr, KW: tl.constexpr, LAYOUT: tl.constexpr,
                      HAS_RES: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Implicit-GEMM convolution of one instance over its kept input channels only, on the tensor
    cores, with the epilogue fused: ``out = act(bias + res + sum_j sum_taps x[idx[j]] * w[idx[j]])``.

    Program (pid_m, pid_n, n): output pixels ``[pid_m * BLOCK_M, ...)`` x output channels
    ``[pid_n * BLOCK_N, ...)`` of instance ``n``. One flat loop over (kept-channel block, tap), so
    the software pipeline runs across taps and channel blocks alike and its shared memory does not
    grow with the kernel size; it runs ``ceil(cnt[n] / BLOCK_K) * KH * KW`` times: dropped channels
    cost nothing. ``PRECISION``: ``tl.dot``'s input precision for float32 maps ("tf32" or "ieee");
    16-bit maps use their own type. ``UPCAST``: dot in float32 (the CPU interpreter's bfloat16 dot
    is wrong; the tensor cores' product of two 16-bit numbers is exact in float32, so the result is
    the same). ``ACT``: 0 none, 1 ReLU, 2 ReLU6.
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
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    cnt = tl.load(cnt_ptr + n)
    x_n = x_ptr + n.to(tl.int64) * C * H * W
    idx_n = idx_ptr + n.to(tl.int64) * K_MAX
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    steps = tl.cdiv(cnt, BLOCK_K) * (KH * KW)
    for t in range(0, steps):
        cb = t // (KH * KW)
        r = t - cb * (KH * KW)
        kh = r // KW
        kw = r - kh * KW
        offs_k = cb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < cnt
        ch = tl.load(idx_n + offs_k, mask=k_ok, other=0)
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if LAYOUT == 0:
            a_off = ch[None, :] * (H * W) + (ih * W + iw)[:, None]
        else:
            a_off = (ih * W + iw)[:, None] * C + ch[None, :]
        a = tl.load(x_n + a_off, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (ch * (KH * KW) + r).to(tl.int64)[:, None] * COUT + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif PRECISION == "none":
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if LAYOUT == 0:
        o_off = offs_n[None, :] * (HO * WO) + offs_m[:, None]
    else:
        o_off = offs_m[:, None] * COUT + offs_n[None, :]
    o_base = n.to(tl.int64) * COUT * HO * WO
    o_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + o_base + o_off, mask=o_ok, other=0.0).to(tl.float32)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.minimum(tl.maximum(acc, 0.0), 6.0)
    tl.store(out_ptr + o_base + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
