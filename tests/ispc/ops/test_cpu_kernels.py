"""Eager CPU kernels with prepared weights equal the masked-dense reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from ispc.ops import gated_conv as gc
from ispc.ops.cpu_kernels import gated_conv2d_gemm, im2col, prepare_weight, run_strategy


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
