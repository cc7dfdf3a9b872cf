"""Eager CPU kernels with prepared weights equal the masked-dense reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from ispc.ops import gated_conv as gc
from ispc.ops import native
from ispc.ops.cpu_kernels import (gated_conv2d_gather_native, gated_conv2d_gemm, im2col, prepare_weight,
                                  run_strategy)

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: "
                                  f"{native.unavailable_reason()}")


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil", [
    (16, 8, 3, 1, 1, 1), (13, 29, 3, 2, 1, 1), (24, 16, 1, 1, 0, 1), (24, 16, 1, 2, 0, 1),
    (17, 5, 5, 2, 2, 1), (32, 12, 3, 1, 2, 2), (20, 8, 1, 1, 1, 1),
])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_gemm_matches_reference(cin, cout, k, stride, pad, dil, n):
    x, w, b = torch.randn(n, cin, 11, 9), torch.randn(cout, cin, k, k), torch.randn(cout)
    scale = torch.rand(cin) + 0.5
    wt = prepare_weight(w)
    for mode, thr, kk in [(gc.TOPK, 0.0, max(1, cin // 2)), (gc.THRESHOLD, 0.8, 0),
                          (gc.THRESHOLD, 1e9, 0), (gc.TOPK, 0.0, 0), (gc.TOPK, 0.0, cin)]:
        ref = gc.gated_conv2d_reference(x, w, b, scale, stride, stride, pad, pad, dil, dil, mode,
                                        thr, kk, 0)
        out = gated_conv2d_gemm(x, w, wt, b, scale, (stride, stride), (pad, pad), (dil, dil), mode,
                                thr, kk, 0)
        assert rel_err(out, ref) <= 1e-5


def test_run_strategy_all_agree():
    x, w, b = torch.randn(2, 16, 8, 8), torch.randn(8, 16, 3, 3), torch.randn(8)
    s = torch.ones(16)
    ref = gc.gated_conv2d_reference(x, w, b, s, 1, 1, 1, 1, 1, 1, gc.TOPK, 0.0, 8, 0)
    for strat in ("gather", "grouped", "gemm"):
        out = run_strategy(strat, x, w, prepare_weight(w), b, s, (1, 1), (1, 1), (1, 1), gc.TOPK, 0.0, 8, 0)
        assert rel_err(out, ref) <= 1e-5


@needs_native
@pytest.mark.parametrize("cin,cout,k,stride,pad,dil", [
    (16, 8, 3, 1, 1, 1), (13, 29, 3, 2, 1, 1), (24, 16, 1, 1, 0, 1), (17, 5, 5, 2, 2, 1),
    (32, 12, 3, 1, 2, 2), (20, 8, 1, 1, 1, 1),
])
@pytest.mark.parametrize("n", [1, 3])
def test_gather_native_matches_reference(cin, cout, k, stride, pad, dil, n):
    """Selection and gathers in C, oneDNN on the kept channels: the masked-dense reference for both
    modes and saliencies, including nothing kept, everything kept and ties at zero saliency (NaN
    saliencies: test_native_select_and_gather)."""
    g = torch.Generator().manual_seed(cin * 100 + n)
    x = torch.randn(n, cin, 11, 9, generator=g).relu()
    x[0, 1] = 0.0  # a channel with zero saliency: threshold ties
    w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
        for mode, thr, kk in [(gc.TOPK, 0.0, max(1, cin // 2)), (gc.TOPK, 0.0, 1), (gc.THRESHOLD, 0.5, 0),
                              (gc.THRESHOLD, 1e9, 0), (gc.TOPK, 0.0, 0), (gc.TOPK, 0.0, cin)]:
            ref = gc.gated_conv2d_reference(x, w, b, scale, stride, stride, pad, pad, dil, dil, mode,
                                            thr, kk, sal)
            out = gated_conv2d_gather_native(x, w, b, scale, (stride, stride), (pad, pad), (dil, dil),
                                             mode, thr, kk, sal)
            assert out.shape == ref.shape and out.is_contiguous()
            assert rel_err(out, ref) <= 1e-5, (sal, mode, thr, kk)
            # a channels-last input: the same result, channels-last (the layout carries on)
            xcl = x.contiguous(memory_format=torch.channels_last)
            out = gated_conv2d_gather_native(xcl, w, b, scale, (stride, stride), (pad, pad),
                                             (dil, dil), mode, thr, kk, sal)
            assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
            assert rel_err(out, ref) <= 1e-5, ("channels-last", sal, mode, thr, kk)
            # run_strategy routes gather, and grouped at batch 1, here (grouped at batch 3 is the
            # PyTorch kernel: the same result)
            for strat in ("gather", "grouped"):
                got = run_strategy(strat, x, w, None, b, scale, (stride, stride), (pad, pad),
                                   (dil, dil), mode, thr, kk, sal)
                assert rel_err(got, ref) <= 1e-5


@needs_native
def test_native_select_and_gather():
    x = torch.tensor([[1.0, 5.0, 3.0, float("nan"), 2.0]]).view(1, 5, 1, 1).repeat(2, 1, 2, 2)
    x[1] = torch.arange(5.0).view(5, 1, 1)
    idx, counts = native.select(x, torch.ones(5), gc.TOPK, 0.0, 2, gc.SALIENCY_L2)
    # NaN counts as the largest (torch.topk); kept channels ascending, then zeros
    assert counts.tolist() == [2, 2] and idx.tolist() == [[1, 3, 0, 0, 0], [3, 4, 0, 0, 0]]
    idx, counts = native.select(x, torch.ones(5), gc.THRESHOLD, 2.5, 0, gc.SALIENCY_L1)
    assert counts.tolist() == [2, 2] and idx[:, :2].tolist() == [[1, 2], [3, 4]]
    # gather: per-row indices with zero rows past the counts, or one row shared by all
    src = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    got = native.gather(src, torch.tensor([[4, 0, 2], [1, 1, 3]]), 3, torch.tensor([3, 1]))
    assert torch.equal(got, torch.stack([src[0, [4, 0, 2]], torch.cat([src[1, [1]], torch.zeros(2, 3)])]))
    assert torch.equal(native.gather(src, torch.tensor([3, 0]), 2), src[:, [3, 0]])
    # the C entries read raw memory: anything that would make them read past it is refused
    for bad, msg in [(lambda: native.gather(src, torch.tensor([0, 5]), 2), "outside"),
                     (lambda: native.gather(src, torch.tensor([0, 1]), 3), "width=3"),
                     (lambda: native.gather(src.double(), torch.tensor([0, 1]), 2), "float32"),
                     (lambda: native.gather(src, torch.tensor([0, 1], dtype=torch.int32), 2), "int64"),
                     (lambda: native.gather(src, torch.zeros(3, 2, dtype=torch.int64), 2), "2 rows"),
                     (lambda: native.gather(src.view(-1), torch.tensor([0]), 1), "rows and channels"),
                     (lambda: native.select(x, torch.ones(4), gc.TOPK, 0.0, 2, 0), "4 entries"),
                     (lambda: native.select(x[:, ::2], torch.ones(3), gc.TOPK, 0.0, 1, 0), "contiguous")]:
        with pytest.raises(ValueError, match=msg):
            bad()


@needs_native
@pytest.mark.parametrize("n,c,h,w", [(1, 64, 56, 56), (2, 37, 9, 11), (3, 16, 5, 5), (2, 5, 1, 7),
                                     (1, 130, 30, 30)])
def test_channels_last_select_gather_and_pool_equal_the_nchw_ones(n, c, h, w):
    """The channels-last entries (a model running NHWC) give the NCHW entries' selection
    exactly, the same gathered values in the channels-last layout, and the same pool."""
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = torch.randn(n, c, h, w, generator=g).relu()
    x[0, 1] = 0.0  # zero-saliency ties
    if c > 3:
        x[-1, 3, 0, 0] = float("nan")  # NaN saliency: the largest
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert native.is_channels_last(xcl) and not native.is_channels_last(x)
    scale = torch.rand(c, generator=g) + 0.5
    for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
        for mode, thr, kk in [(gc.TOPK, 0.0, max(1, c // 2)), (gc.TOPK, 0.0, 0), (gc.TOPK, 0.0, c),
                              (gc.THRESHOLD, 0.6, 0), (gc.THRESHOLD, 1e9, 0)]:
            idx, counts = native.select(x, scale, mode, thr, kk, sal)
            idx_cl, counts_cl = native.select(xcl, scale, mode, thr, kk, sal)
            assert torch.equal(counts_cl, counts) and torch.equal(idx_cl, idx), (sal, mode, thr)
            for width in {int(counts.max()), c}:
                want = torch.stack([native.gather(x[i:i + 1], idx[i:i + 1], width, counts[i:i + 1])[0]
                                    for i in range(n)])
                got = native.gather(xcl, idx, width, counts)
                assert got.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(got.nan_to_num(), want.nan_to_num()), (sal, mode, width)
    for clamp in (native.NO_CLAMP, native.RELU6):
        want = native.maxpool2x2(x, clamp)
        got = native.maxpool2x2(xcl, clamp)
        if want is None:
            assert got is None  # no AVX-512: neither layout has the C pool
            continue
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(got.isnan(), want.isnan())


@needs_native
def test_channels_last_gather_refuses_what_it_cannot_read():
    xcl = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    counts = torch.tensor([2, 2])
    for bad, msg in [(lambda: native.gather(xcl, torch.tensor([[0, 6], [1, 2]]).repeat(1, 3), 2, counts),
                      "outside"),
                     (lambda: native.gather(xcl, torch.zeros(2, 6, dtype=torch.int64), 7, counts),
                      "width=7"),
                     (lambda: native.gather(xcl, torch.zeros(1, 6, dtype=torch.int64), 2), "row per"),
                     (lambda: native.gather(xcl.double(), torch.zeros(2, 6, dtype=torch.int64), 2),
                      "float32")]:
        with pytest.raises(ValueError, match=msg):
            bad()


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 5), (2, 1), (0, 2), (1, 1)), ((3, 3), (1, 1), (2, 2), (2, 2)), ((7, 7), (2, 2), (3, 3), (1, 1)),
    ((2, 2), (3, 2), (1, 0), (1, 2))])
@pytest.mark.parametrize("c,h,w", [(1, 5, 5), (6, 9, 7), (32, 14, 14)])
def test_im2col_equals_unfold(kernel, stride, padding, dilation, c, h, w):
    x = torch.randn(c, h, w, generator=torch.Generator().manual_seed(c * h + w))
    expect = F.unfold(x[None], kernel, dilation, padding, stride)[0]
    got = im2col(x, kernel, stride, padding, dilation)
    assert got.shape == expect.shape and got.is_contiguous()
    assert torch.equal(got, expect)


@needs_native
@pytest.mark.parametrize("cin,cout,k,stride,pad,dil", [
    (8, 12, 3, 1, 1, 1), (16, 20, 1, 1, 0, 1), (9, 33, 3, 2, 1, 1), (12, 8, 3, 1, 2, 2),
    (24, 70, 1, 2, 0, 1)])
@pytest.mark.parametrize("n", [1, 3])
def test_nhwc_strategy_matches_reference_and_falls_back_on_nchw(cin, cout, k, stride, pad, dil, n):
    """run_strategy('nhwc'): channels-last input through NhwcConv (output channels-last), an NCHW
    one through gather; both the masked-dense reference, in both modes and saliencies."""
    from ispc.ops import gated_conv as gc
    from ispc.ops.cpu_kernels import nhwc_serves, run_strategy

    g = torch.Generator().manual_seed(cin * 100 + cout + n)
    x = torch.randn(n, cin, 11, 9, generator=g) * torch.rand(1, cin, 1, 1, generator=g) * 3
    w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    layer = native.NhwcConv(w, b, stride, pad, dil, out_hw=30)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert nhwc_serves(xcl) and not nhwc_serves(x) and not nhwc_serves(xcl.double())
    for mode, thr, kk in [(gc.TOPK, 0.0, cin // 2), (gc.TOPK, 0.0, 1), (gc.THRESHOLD, 0.9, 0),
                          (gc.TOPK, 0.0, cin)]:
        for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            args = ((stride, stride), (pad, pad), (dil, dil), mode, thr, kk, sal)
            want = gc.gated_conv2d_reference(x, w, b, scale, stride, stride, pad, pad, dil, dil,
                                             mode, thr, kk, sal)
            got = run_strategy("nhwc", xcl, w, layer, b, scale, *args)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(run_strategy("nhwc", x, w, layer, b, scale, *args), want,
                                       rtol=1e-5, atol=1e-4)
