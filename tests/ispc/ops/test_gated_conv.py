"""The gated operator: every kernel equals the masked-dense reference; masks are as configured."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import rel_err
from ispc.ops import gated_conv as gc

KERNELS = {"loop": gc.gated_conv2d_loop, "grouped": gc.gated_conv2d_grouped,
           "op": torch.ops.ispc.gated_conv2d}

# (cin, cout, kernel, stride, padding, dilation, H, W)
SHAPES = [
    (16, 8, 3, 1, 1, 1, 8, 8),
    (13, 29, 3, 2, 1, 1, 9, 11),   # odd channels, stride 2, odd spatial
    (24, 16, 1, 1, 0, 1, 7, 7),    # pointwise
    (17, 5, 5, 2, 2, 1, 12, 10),   # 5x5
    (32, 12, 3, 1, 2, 2, 10, 10),  # dilation 2
    (8, 8, (3, 1), (2, 1), (1, 0), 1, 6, 9),  # rectangular kernel, asymmetric stride/padding
]


def _args(x, w, b, stride, pad, dil, mode, thr, k, sal=gc.SALIENCY_L2, scale=None):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(pad), pair(dil)
    scale = torch.ones(x.shape[1]) if scale is None else scale
    return (x, w, b, scale, sh, sw, ph, pw, dh, dw, mode, thr, k, sal)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_match_reference(shape, n, kernel):
    cin, cout, ks, stride, pad, dil, h, w = shape
    kh, kw = ks if isinstance(ks, tuple) else (ks, ks)
    x = torch.randn(n, cin, h, w)
    wt = torch.randn(cout, cin, kh, kw)
    b = torch.randn(cout)
    for mode, thr, k in [(gc.TOPK, 0.0, max(1, cin // 2)), (gc.TOPK, 0.0, 1),
                         (gc.THRESHOLD, 0.9, 0), (gc.THRESHOLD, 1.05, 0)]:
        for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            a = _args(x, wt, b, stride, pad, dil, mode, thr, k, sal)
            ref = gc.gated_conv2d_reference(*a)
            out = KERNELS[kernel](*a)
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= 1e-5, (mode, sal)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_all_kept_equals_dense_conv(kernel):
    x, w, b = torch.randn(3, 20, 9, 9), torch.randn(10, 20, 3, 3), torch.randn(10)
    dense = torch.nn.functional.conv2d(x, w, b, 1, 1)
    for mode, thr, k in [(gc.TOPK, 0.0, 20), (gc.THRESHOLD, 0.0, 0)]:
        out = KERNELS[kernel](*_args(x, w, b, 1, 1, 1, mode, thr, k))
        assert rel_err(out, dense) <= 1e-6


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_nothing_kept_gives_bias(kernel):
    x, w, b = torch.randn(4, 12, 6, 6), torch.randn(7, 12, 3, 3), torch.randn(7)
    for mode, thr, k in [(gc.THRESHOLD, 1e9, 0), (gc.TOPK, 0.0, 0)]:
        out = KERNELS[kernel](*_args(x, w, b, 1, 1, 1, mode, thr, k))
        assert torch.allclose(out, b.view(1, -1, 1, 1).expand_as(out))


def test_mixed_threshold_counts_in_one_batch():
    """Instances with 0, some and all channels kept in the same batch (padding path)."""
    x = torch.randn(4, 16, 8, 8)
    x[0] *= 1e-3  # nothing passes the threshold
    x[3] *= 1e3   # everything passes
    w, b = torch.randn(6, 16, 3, 3), torch.randn(6)
    a = _args(x, w, b, 1, 1, 1, gc.THRESHOLD, 0.8, 0)
    counts = gc.channel_mask(x, torch.ones(16), gc.THRESHOLD, 0.8, 0).sum(1)
    assert counts[0] == 0 and counts[3] == 16 and 0 < counts[1] < 16
    ref = gc.gated_conv2d_reference(*a)
    for fn in KERNELS.values():
        assert rel_err(fn(*a), ref) <= 1e-5


def test_masks_as_configured():
    x = torch.randn(6, 32, 5, 5)
    scale = torch.ones(32)
    m = gc.channel_mask(x, scale, gc.TOPK, 0.0, 11)
    assert m.dtype == torch.bool and m.shape == (6, 32)
    assert (m.sum(1) == 11).all()
    s = gc.channel_saliency(x, scale)
    # the kept channels are the most salient ones of each instance
    for i in range(6):
        assert s[i][m[i]].min() >= s[i][~m[i]].max()
    t = float(s.median())
    mt = gc.channel_mask(x, scale, gc.THRESHOLD, t, 0)
    assert torch.equal(mt, s >= t)
    # instances keep different numbers of channels in threshold mode
    assert len(set(mt.sum(1).tolist())) > 1


def test_saliency_is_rms_and_scaled():
    x = torch.randn(2, 3, 4, 5)
    scale = torch.tensor([1.0, 2.0, 0.5])
    s = gc.channel_saliency(x, scale, gc.SALIENCY_L2)
    expect = x.pow(2).mean((2, 3)).sqrt() * scale
    assert torch.allclose(s, expect, rtol=1e-5)
    s1 = gc.channel_saliency(x, scale, gc.SALIENCY_L1)
    assert torch.allclose(s1, x.abs().mean((2, 3)) * scale, rtol=1e-5)
    # size-normalized: tiling the map does not change the l2 saliency
    assert torch.allclose(gc.channel_saliency(x.repeat(1, 1, 2, 2), scale), s, rtol=1e-5)


def test_fake_impl_gives_dense_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 16, 17, 13)
        w = torch.empty(8, 16, 3, 3)
        out = torch.ops.ispc.gated_conv2d(x, w, torch.empty(8), torch.empty(16), 2, 2, 1, 1, 1, 1,
                                          gc.THRESHOLD, 0.5, 0, 0)
        assert tuple(out.shape) == (3, 8, 9, 7)


def test_opcheck():
    x, w, b = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3), torch.randn(4)
    torch.library.opcheck(torch.ops.ispc.gated_conv2d.default,
                          _args(x, w, b, 1, 1, 1, gc.TOPK, 0.0, 4),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradient_matches_masked_dense():
    x = torch.randn(3, 10, 7, 7, requires_grad=True)
    w = torch.randn(6, 10, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    a = _args(x, w, b, 1, 1, 1, gc.THRESHOLD, 0.9, 0)
    torch.ops.ispc.gated_conv2d(*a).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    m = gc.channel_mask(x.detach(), torch.ones(10), gc.THRESHOLD, 0.9, 0)
    torch.nn.functional.conv2d(x * m[:, :, None, None], w, b, 1, 1).square().sum().backward()
    for g, t in zip(grads, (x, w, b)):
        assert rel_err(g, t.grad) <= 1e-5


def test_conv_out_size_matches_torch():
    for size, k, s, p, d in itertools.product([5, 8, 13], [1, 3, 5], [1, 2, 3], [0, 1, 2], [1, 2]):
        if size + 2 * p < d * (k - 1) + 1:
            continue
        out = torch.nn.functional.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k),
                                         stride=s, padding=p, dilation=d)
        assert gc.conv_out_size(size, k, s, p, d) == out.shape[-1]


def test_arg_names_follow_the_operator_schema():
    schema = torch.ops.ispc.gated_conv2d.default._schema
    assert tuple(a.name for a in schema.arguments) == gc.ARG_NAMES
