"""The fused expansion + depthwise op's depthwise rows several at a time (dwr_out_rows; on AVX2
builds dwr2_whole, also in the channel-split op): against the masked-dense reference, and bit for
bit (outputs and output sums) the build that runs them one row at a time with dw_row
(-DDWR_ROWS=1 -DDW_AVX2_ROWS=0: AVX2 builds' dw2_out_rows sums maps in L2 in another order)."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from ispc.ops import gated_conv as gc
from ispc.ops import native
from conftest import rel_err

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _builds(*flag_sets):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants")
    try:
        return [native._build(f) for f in flag_sets]
    except RuntimeError as exc:
        pytest.skip(f"cannot build the variants: {exc}")


# the reference build: one row at a time, dw_row (the same output sums' grouping on either ISA)
OLD = ("-DDWR_ROWS=1", "-DDW_AVX2_ROWS=0")


def _run(lib, monkeypatch, pw, dw, x, mode, scale, k, xs, res, sums_kind, by_channels=False):
    """The fused op on ``lib``: its output and output sums (None without)."""
    monkeypatch.setattr(native, "_lib", lib)
    n, c, h, w = x.shape
    ho, wo = dw.out_size(*pw.out_size(h, w))
    prog = native.OpProgram()
    prog.add_expand_dw(pw, dw, 0, 1, (n, c, h, w), mode, scale if mode != native.DENSE else None,
                       0.0, k, gc.SALIENCY_L2, native.RELU6, native.RELU6,
                       res=4 if res is not None else -1,
                       sums_in=3 if mode != native.DENSE else -1,
                       sums_out=2 if sums_kind is not None else -1, sums_kind=sums_kind or 0,
                       by_channels=by_channels)
    out, sums = _nhwc(torch.empty(n, dw.channels, ho, wo)), torch.empty(n, dw.channels)
    slots = native.OpProgram.slot_array(5)
    for i, t in enumerate((x, out, sums, xs, x if res is None else res)):
        slots[i] = t.data_ptr()
    prog.run(slots)
    return out, (sums if sums_kind is not None else None)


# (n, c, e, h, w, first kernel, first stride, depthwise stride, by channels): MobileNetV2's stem
# (3x3 stride 2) and 1x1 expansions at both strides; 20 and 40 channels: a partial last vector of
# channels (of 16 and of 8 lanes); odd widths and heights: tiles cut short, groups of rows that end
# in 2 or 1 rows; 96 channels at width 30: rows in several segments (dwr2_whole); by channels: the
# channel-split op (1x1 only; AVX2 builds run its rows several at a time)
SHAPES = [(1, 3, 32, 40, 36, 3, 2, 1, False), (2, 16, 96, 23, 30, 1, 1, 2, False),
          (1, 24, 144, 21, 17, 1, 1, 1, False), (2, 8, 20, 19, 11, 1, 1, 1, False),
          (1, 8, 40, 26, 9, 1, 1, 2, False), (1, 16, 96, 13, 13, 1, 1, 1, True),
          (2, 8, 44, 9, 7, 1, 1, 2, True), (1, 24, 144, 14, 14, 1, 1, 1, True)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_depthwise_rows_equal_one_row_at_a_time(shape, monkeypatch):
    n, c, e, h, w, kh, s1, s2, by_channels = shape
    new, old = _builds((), OLD)
    g = torch.Generator().manual_seed(sum(shape))
    x = _nhwc(torch.randn(n, c, h, w, generator=g) * (torch.rand(1, c, 1, 1, generator=g) + 0.1))
    wp, bp = torch.randn(e, c, kh, kh, generator=g) * 0.3, torch.randn(e, generator=g)
    wd, bd = torch.randn(e, 1, 3, 3, generator=g), torch.randn(e, generator=g)
    scale = torch.rand(c, generator=g) + 0.5
    xs = (x * x).sum((2, 3)).contiguous()  # the input's saliency sums, as a layer before hands them
    k = max(1, c // 2)
    threads = torch.get_num_threads()
    try:
        for mode in (native.DENSE, gc.TOPK):
            mid = (F.conv2d(x, wp, bp, s1, kh // 2) if mode == native.DENSE else
                   gc.gated_conv2d_reference(x, wp, bp, scale, s1, s1, kh // 2, kh // 2, 1, 1,
                                             gc.TOPK, 0.0, k)).clamp(0, 6)
            base = F.conv2d(mid, wd, bd, s2, 1, groups=e)
            res = _nhwc(torch.randn(base.shape, generator=g))
            for r in (None, res):
                ref = (base if r is None else base + r).clamp(0, 6)
                for nth in (1, 2):
                    torch.set_num_threads(nth)
                    for kind in (None, gc.SALIENCY_L1, gc.SALIENCY_L2):
                        outs = []
                        for lib in (new, old):
                            # packed under the library that runs them (the suite's default build
                            # may be another ISA's: ISPC_NATIVE_FLAGS=-mno-avx512f)
                            monkeypatch.setattr(native, "_lib", lib)
                            pw = native.NhwcConv(wp, bp, stride=s1, padding=kh // 2)
                            dw = native.DepthwiseConv3x3(wd, bd, stride=s2)
                            outs.append(_run(lib, monkeypatch, pw, dw, x, mode, scale, k, xs, r,
                                             kind, by_channels))
                        case = (shape, mode, r is not None, nth, kind)
                        assert rel_err(outs[0][0], ref) < 1e-5, case
                        assert torch.equal(outs[0][0], outs[1][0]), case
                        if kind is not None:
                            assert torch.equal(outs[0][1], outs[1][1]), case
                            want = (ref * ref if kind == gc.SALIENCY_L2 else ref.abs()).sum((2, 3))
                            assert rel_err(outs[0][1], want) < 1e-5, case
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(1, 384, 14, 14, 1), (2, 576, 14, 14, 2), (2, 40, 13, 9, 1),
                                   (1, 20, 11, 12, 2), (3, 32, 7, 7, 1), (1, 96, 57, 31, 2),
                                   (1, 32, 112, 112, 1)])
def test_depthwise_layer_rows_equal_one_row_at_a_time(shape, monkeypatch):
    """The depthwise layer's own call (dw_region): rows of an instance several at a time, the
    thread's share ending mid-instance, partial channel vectors, odd widths, a residual, output
    sums; MobileNetV2's 112x112 layer (maps past L2: no segments on the old AVX2 path)."""
    n, c, h, w, s = shape
    new, old = _builds((), OLD)
    g = torch.Generator().manual_seed(sum(shape))
    x = _nhwc(torch.randn(n, c, h, w, generator=g))
    wd, bd = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    base = F.conv2d(x, wd, bd, s, 1, groups=c)
    res = _nhwc(torch.randn(base.shape, generator=g))
    threads = torch.get_num_threads()
    try:
        for r in (None, res):
            ref = (base if r is None else base + r).clamp(0, 6)
            for nth in (1, 2):
                torch.set_num_threads(nth)
                for kind in (None, gc.SALIENCY_L1, gc.SALIENCY_L2):
                    outs = []
                    for lib in (new, old):
                        monkeypatch.setattr(native, "_lib", lib)
                        dw = native.DepthwiseConv3x3(wd, bd, stride=s)
                        sums = None if kind is None else torch.empty(n, c)
                        outs.append((dw(x, residual=r, clamp=native.RELU6, out_sums=sums,
                                        out_sums_kind=kind or 0), sums))
                    case = (shape, r is not None, nth, kind)
                    assert rel_err(outs[0][0], ref) < 1e-5, case
                    assert torch.equal(outs[0][0], outs[1][0]), case
                    if kind is not None:
                        assert torch.equal(outs[0][1], outs[1][1]), case
    finally:
        torch.set_num_threads(threads)
