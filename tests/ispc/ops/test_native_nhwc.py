"""The channels-last native kernels (``native.NhwcConv``, ``native.DepthwiseConv3x3``) equal the
masked-dense reference: dense and gated, both modes and saliencies, every register tile, fused
epilogues, batches whose instances keep different channel counts, and the AVX2 build."""
from __future__ import annotations

import copy
import ctypes
import math
import pickle
import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, threshold_between
from ispc.errors import ConfigError, DataError
from ispc.ops import gated_conv as gc
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")

CLAMPS = [native.NO_CLAMP, native.RELU, native.RELU6]


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _reference(x, w, b, stride, pad, dil, mode, scale, thr, k, sal, res=None, clamp=native.NO_CLAMP):
    """conv2d of x with each instance's dropped channels zeroed (where, not a product: a NaN in a
    dropped channel must not reach the output), + residual, clamped."""
    if mode == native.DENSE:
        xm = x
    else:
        m = gc.channel_mask(x, scale, mode, thr, k, sal)
        xm = torch.where(m[:, :, None, None], x, torch.zeros((), dtype=x.dtype))
    out = F.conv2d(xm, w, b, stride, pad, dil)
    if res is not None:
        out = out + res
    return out.clamp(*clamp) if clamp != native.NO_CLAMP else out


def _check(out, ref, what):
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last), what
    assert torch.equal(out.isnan(), ref.isnan()), what
    ok = ~ref.isnan()
    assert rel_err(out[ok], ref[ok]) <= 1e-5, what


def _max_vectors() -> int:
    return int(native._lib.ispc_nhwc_max_vectors())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 40), cout=st.integers(1, 70), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2),
       pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2), h=st.integers(3, 15),
       w=st.integers(3, 15), mode=st.sampled_from([native.DENSE, gc.TOPK, gc.THRESHOLD]),
       keep=st.floats(0.0, 1.0), sal=st.sampled_from([gc.SALIENCY_L2, gc.SALIENCY_L1]),
       residual=st.booleans(), clamp=st.sampled_from(CLAMPS), vectors=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_random_geometry_matches_reference(n, cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, h, w, mode,
                                           keep, sal, residual, clamp, vectors, seed):
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # no output position
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g) * (torch.rand(1, cin, 1, 1, generator=g) + 0.1)
    wt, b = torch.randn(cout, cin, kh, kw, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    thr, k = 0.0, int(round(keep * cin))
    if mode == gc.THRESHOLD:
        thr = threshold_between(gc.channel_saliency(x, scale, sal), keep)
    layer = native.NhwcConv(wt, b, (sh, sw), (ph, pw), (dh, dw), vectors=min(vectors, _max_vectors()))
    ref0 = _reference(x, wt, b, (sh, sw), (ph, pw), (dh, dw), mode, scale, thr, k, sal)
    res = _nhwc(torch.randn(ref0.shape, generator=g)) if residual else None
    ref = _reference(x, wt, b, (sh, sw), (ph, pw), (dh, dw), mode, scale, thr, k, sal, res, clamp)
    counts = torch.empty(n, dtype=torch.int64)
    out = layer(_nhwc(x), mode, scale=scale, threshold=thr, k=k, saliency=sal, residual=res,
                clamp=clamp, counts=counts)
    _check(out, ref, (mode, k, thr, layer.vectors))
    if mode != native.DENSE:
        want = gc.channel_mask(x, scale, mode, thr, k, sal).sum(1)
        assert torch.equal(counts, want)


@pytest.mark.parametrize("vectors", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [
    # (cin, cout, k, stride, pad, h): ResNet-like layers, a 7x7 stem, 1x1 strided, odd sizes; on
    # AVX-512 both 4-vector tiles (7x4 on the 7x7 and 5x5 maps, 6x4 on the others)
    (64, 64, 3, 1, 1, 14), (32, 96, 1, 1, 0, 12), (48, 80, 1, 2, 0, 13), (3, 64, 7, 2, 3, 30),
    (130, 40, 3, 2, 1, 9), (24, 16, 3, 1, 1, 7)])
def test_every_tile_on_layer_shapes(vectors, shape):
    if vectors > _max_vectors():
        pytest.skip(f"this build's widest tile has {_max_vectors()} vectors")
    cin, cout, ks, s, p, h = shape
    g = torch.Generator().manual_seed(cin + cout + ks)
    x = torch.randn(2, cin, h, h, generator=g).relu() * (torch.rand(1, cin, 1, 1, generator=g) + .1)
    wt, b, scale = torch.randn(cout, cin, ks, ks, generator=g), torch.randn(cout, generator=g), \
        torch.ones(cin)
    layer = native.NhwcConv(wt, b, s, p, 1, vectors=vectors)
    assert layer.vectors == vectors
    for mode, k in [(native.DENSE, 0), (gc.TOPK, max(1, cin // 2)), (gc.TOPK, cin - 1)]:
        ref = _reference(x, wt, b, s, p, 1, mode, scale, 0.0, k, gc.SALIENCY_L2)
        r = _nhwc(torch.randn(ref.shape, generator=g))
        for res, clamp in [(None, native.NO_CLAMP), (r, native.RELU), (None, native.RELU6)]:
            want = _reference(x, wt, b, s, p, 1, mode, scale, 0.0, k, gc.SALIENCY_L2, res, clamp)
            out = layer(_nhwc(x), mode, scale=scale, k=k, residual=res, clamp=clamp)
            _check(out, want, (mode, k, clamp))


@pytest.mark.parametrize("shape", [(320, 160, 3, 1, 1, 5), (2048, 200, 1, 1, 0, 3)])
def test_weights_past_the_prefetch_thresholds(shape):
    # layers whose weights (2 and 1.6 MB) take the prefetching walks, dense and gated, with kept
    # counts below and above the prefetch distance, so that the look-ahead crosses segment ends
    cin, cout, ks, s, p, h = shape
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(3, cin, h, h, generator=g).relu() * (torch.rand(3, cin, 1, 1, generator=g) + .1)
    wt, b, scale = torch.randn(cout, cin, ks, ks, generator=g), torch.randn(cout, generator=g), \
        torch.ones(cin)
    assert wt.numel() * 4 >= 1536 << 10
    layer = native.NhwcConv(wt, b, s, p, 1)
    for mode, k in [(native.DENSE, 0), (gc.TOPK, 1), (gc.TOPK, 5), (gc.TOPK, 9), (gc.TOPK, cin // 3)]:
        want = _reference(x, wt, b, s, p, 1, mode, scale, 0.0, k, gc.SALIENCY_L2, None, native.RELU)
        _check(layer(_nhwc(x), mode, scale=scale, k=k, clamp=native.RELU), want, (mode, k))


@pytest.mark.parametrize("shape", [(2048, 512, 1, 1, 0, 7), (512, 512, 3, 1, 1, 7),
                                   (1024, 2048, 1, 2, 0, 14), (1024, 256, 1, 1, 0, 14)])
def test_resnet50_deep_layers_compacted_and_prefetching(shape):
    # ResNet-50's layer4 and layer3 shapes, where at batch 1 each thread's tiles walk a
    # compacted copy of the kept weight rows and prefetch the next group's (a batch of 3 walks
    # by index): top-k, threshold, and every channel kept (equal to the dense mode's output)
    cin, cout, ks, s, p, h = shape
    g = torch.Generator().manual_seed(cout + ks)
    x = torch.randn(3, cin, h, h, generator=g).relu() * (torch.rand(3, cin, 1, 1, generator=g) + .1)
    wt, b = torch.randn(cout, cin, ks, ks, generator=g) / (cin * ks * ks) ** 0.5, torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    thr = threshold_between(gc.channel_saliency(x, scale), 0.5)
    layer = native.NhwcConv(wt, b, s, p, 1, out_hw=((h + 2 * p - ks) // s + 1) ** 2)
    for xb in (x[:1], x):
        xs = _nhwc(xb)
        for mode, t, k in [(gc.TOPK, 0.0, cin // 2), (gc.THRESHOLD, thr, 0)]:
            want = _reference(xb, wt, b, s, p, 1, mode, scale, t, k, gc.SALIENCY_L2, None, native.RELU)
            out = layer(xs, mode, scale=scale, threshold=t, k=k, clamp=native.RELU)
            _check(out, want, (shape, mode, len(xb)))
        dense = layer(xs, native.DENSE, clamp=native.RELU)
        assert torch.equal(layer(xs, gc.TOPK, scale=scale, k=cin, clamp=native.RELU), dense)


def test_dense_equals_conv2d_and_gated_with_every_channel_kept():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 20, 11, 11, generator=g), torch.randn(30, 20, 3, 3, generator=g), \
        torch.randn(30, generator=g)
    layer = native.NhwcConv(w, b, 1, 1)
    dense = layer(_nhwc(x))
    assert rel_err(dense, F.conv2d(x, w, b, 1, 1)) <= 1e-5
    ones = torch.ones(20)
    assert torch.equal(layer(_nhwc(x), gc.TOPK, scale=ones, k=20), dense)  # the same direct path
    assert torch.equal(layer(_nhwc(x), gc.THRESHOLD, scale=ones, threshold=1e-30), dense)


def test_batch_with_different_counts_including_none_and_all():
    # threshold mode: instance 0 keeps nothing (bias only), 1 keeps everything (the dense path),
    # the others some; one call serves them all, in chunks of instances when the inputs are large
    g = torch.Generator().manual_seed(2)
    for n, c, hw in [(5, 40, 9), (4, 64, 40)]:  # the second: one instance per 1 MB chunk
        x = torch.randn(n, c, hw, hw, generator=g).relu() * torch.rand(n, c, 1, 1, generator=g)
        x[0] *= 1e-4
        x[1] += 5.0
        w, b, scale = torch.randn(24, c, 3, 3, generator=g), torch.randn(24, generator=g), \
            torch.ones(c)
        thr = threshold_between(gc.channel_saliency(x[2:], scale), 0.5)
        counts = torch.empty(n, dtype=torch.int64)
        layer = native.NhwcConv(w, b, 1, 1)
        r = _nhwc(torch.randn(n, 24, hw, hw, generator=g))
        out = layer(_nhwc(x), gc.THRESHOLD, scale=scale, threshold=thr, counts=counts, residual=r,
                    clamp=native.RELU)
        assert counts[0] == 0 and counts[1] == c and len(set(counts[2:].tolist()) | {0, c}) > 2
        assert torch.equal(out[0], (b.view(-1, 1, 1) + r[0]).relu())
        _check(out, _reference(x, w, b, 1, 1, 1, gc.THRESHOLD, scale, thr, 0, gc.SALIENCY_L2, r,
                               native.RELU), n)


def test_selection_equals_the_nchw_entries_with_ties_and_nan():
    # the same kept channels as native.select (both modes and saliencies), with all-zero channels
    # (saliency ties at 0) and a NaN channel: top-k keeps it (NaN counts as the largest, as in
    # torch.topk), threshold drops it; the output is the reference's on the kept channels
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 24, 6, 6, generator=g).relu()
    x[:, ::3] = 0.0
    x[1, 5, 2, 2] = float("nan")
    w, b, scale = torch.randn(8, 24, 3, 3, generator=g), torch.randn(8, generator=g), \
        torch.rand(24, generator=g) + 0.5
    layer = native.NhwcConv(w, b, 1, 1)
    for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
        s = gc.channel_saliency(x, scale, sal)
        finite = s[s.isfinite()]
        for mode, thr, k in [(gc.TOPK, 0.0, 1), (gc.TOPK, 0.0, 10), (gc.TOPK, 0.0, 20),
                             (gc.THRESHOLD, threshold_between(finite, 0.5), 0)]:
            counts = torch.empty(3, dtype=torch.int64)
            out = layer(_nhwc(x), mode, scale=scale, threshold=thr, k=k, saliency=sal, counts=counts)
            idx, want = native.select(_nhwc(x), scale, mode, thr, k, sal)
            assert torch.equal(counts, want), (mode, k, sal)
            _check(out, _reference(x, w, b, 1, 1, 1, mode, scale, thr, k, sal), (mode, k, sal))
            assert out[1].isnan().any() == (mode == gc.TOPK)


def test_chunks_of_instances_and_groups_of_output_blocks(monkeypatch):
    # built to select and convolve one instance at a time and to split the output channels into
    # one group per block: the same results
    lib = native._build(("-DNHWC_CHUNK_BYTES=1", "-DNHWC_GROUP_BYTES=1"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 30, 10, 10, generator=g).relu() * torch.rand(4, 30, 1, 1, generator=g)
    scale = torch.ones(30)
    thr = threshold_between(gc.channel_saliency(x, scale), 0.4)
    monkeypatch.setattr(native, "_lib", lib)
    for ks, s, p in [(3, 1, 1), (1, 1, 0), (1, 2, 0)]:
        w, b = torch.randn(100, 30, ks, ks, generator=g), torch.randn(100, generator=g)
        layer = native.NhwcConv(w, b, s, p)
        for mode in (gc.THRESHOLD, native.DENSE):
            want = _reference(x, w, b, s, p, 1, mode, scale, thr, 0, gc.SALIENCY_L2)
            r = _nhwc(torch.randn(want.shape, generator=g))
            want = (want + r).clamp(*native.RELU6)
            sums = torch.empty(4, 100)
            out = layer(_nhwc(x), mode, scale=scale, threshold=thr, residual=r, clamp=native.RELU6,
                        out_sums=sums)
            _check(out, want, ("chunked", ks, s, mode))
            assert rel_err(sums, _sums(out, gc.SALIENCY_L2)) <= 1e-5


def test_results_do_not_depend_on_threads():
    g = torch.Generator().manual_seed(5)
    x = _nhwc(torch.randn(2, 64, 30, 30, generator=g))
    layer = native.NhwcConv(torch.randn(40, 64, 3, 3, generator=g), torch.randn(40, generator=g), 1, 1)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(layer(x, gc.TOPK, scale=torch.ones(64), k=30))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_bad_arguments_are_refused_with_a_fix():
    w = torch.randn(8, 4, 3, 3)
    layer = native.NhwcConv(w, None, 1, 1)
    x = _nhwc(torch.randn(1, 4, 6, 6))
    with pytest.raises(DataError, match="channels-last float32.*memory_format"):
        layer(x.contiguous())
    with pytest.raises(DataError, match="5 channels"):
        layer(_nhwc(torch.randn(1, 5, 6, 6)))
    with pytest.raises(DataError, match="residual"):
        layer(x, residual=_nhwc(torch.randn(1, 8, 5, 5)))
    with pytest.raises(DataError, match="scale"):
        layer(x, gc.TOPK, k=2)
    with pytest.raises(ConfigError, match="mode"):
        layer(x, 7)
    with pytest.raises(ConfigError, match="saliency"):
        layer(x, gc.TOPK, scale=torch.ones(4), k=2, saliency=5)
    with pytest.raises(DataError, match="smaller than"):
        native.NhwcConv(w, None, 1, 0)(_nhwc(torch.randn(1, 4, 2, 2)))
    with pytest.raises(ConfigError, match="stride"):
        native.NhwcConv(w, None, 0, 1)
    with pytest.raises(ConfigError, match="float32"):
        native.NhwcConv(w.double())
    with pytest.raises(ConfigError, match="vectors"):
        native.NhwcConv(w, vectors=9)
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError)


def test_layers_survive_copy_and_pickle():
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(12, 20, 3, 3, generator=g), torch.randn(12, generator=g)
    x = _nhwc(torch.randn(2, 20, 9, 9, generator=g))
    conv, dw = native.NhwcConv(w, b, 1, 1), native.DepthwiseConv3x3(w[:, :1], b, 2, 1)
    xd = _nhwc(torch.randn(2, 12, 9, 9, generator=g))
    want = conv(x, gc.TOPK, scale=torch.ones(20), k=7), dw(xd)
    for c2, d2 in [(copy.deepcopy(conv), copy.deepcopy(dw)),
                   (pickle.loads(pickle.dumps(conv)), pickle.loads(pickle.dumps(dw)))]:
        assert torch.equal(c2(x, gc.TOPK, scale=torch.ones(20), k=7), want[0])
        assert torch.equal(d2(xd), want[1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20),
       stride=st.integers(1, 2), pad=st.integers(0, 1), residual=st.booleans(),
       clamp=st.sampled_from(CLAMPS), seed=st.integers(0, 2**16))
def test_depthwise_matches_conv2d(n, c, h, w, stride, pad, residual, clamp, seed):
    if h + 2 * pad < 3 or w + 2 * pad < 3:
        return
    g = torch.Generator().manual_seed(seed)
    x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(c, 1, 3, 3, generator=g), \
        torch.randn(c, generator=g)
    ref = F.conv2d(x, wt, b, stride, pad, groups=c)
    res = _nhwc(torch.randn(ref.shape, generator=g)) if residual else None
    if res is not None:
        ref = ref + res
    ref = ref.clamp(*clamp) if clamp != native.NO_CLAMP else ref
    out = native.DepthwiseConv3x3(wt, b, stride, pad)(_nhwc(x), residual=res, clamp=clamp)
    _check(out, ref, (c, h, w, stride, pad))


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0), (2, 0), (1, 2), (3, 1), (2, 2)])
def test_depthwise_tiles_across_wide_rows(stride, pad):
    # rows several register tiles wide with a partial last tile, the padded first and last tiles,
    # a partial channel block, strides without a specialized tile (3), the residual, the clamp and
    # the output's sums at once
    g = torch.Generator().manual_seed(11 + stride * 3 + pad)
    for c, h, w in [(40, 5, 37), (16, 3, 19), (7, 9, 11)]:
        x, wt, b = torch.randn(2, c, h, w, generator=g), torch.randn(c, 1, 3, 3, generator=g), \
            torch.randn(c, generator=g)
        ref = F.conv2d(x, wt, b, stride, pad, groups=c)
        res = _nhwc(torch.randn(ref.shape, generator=g))
        ref = (ref + res).clamp(*native.RELU6)
        sums = torch.empty(2, c)
        out = native.DepthwiseConv3x3(wt, b, stride, pad)(_nhwc(x), residual=res, clamp=native.RELU6,
                                                          out_sums=sums)
        _check(out, ref, (c, h, w, stride, pad))
        assert rel_err(sums, _sums(ref, gc.SALIENCY_L2)) <= 1e-5


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0), (2, 0)])
def test_depthwise_avx2_row_segments(stride, pad, monkeypatch):
    # the AVX2 build's depthwise tiles that load each kernel row's weights as they reach it, over
    # segments of a row (dw2_out_rows, maps up to half of L2): rows of one and of several segments,
    # partial last tiles, a partial channel block after the whole ones, a map past the limit (the
    # old tiles), the residual, the clamp, both saliency sums; the old tiles' values bit for bit
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants")
    new, old = _forced_build(("-mno-avx512f",)), _forced_build(("-mno-avx512f", "-DDW_AVX2_ROWS=0"))
    g = torch.Generator().manual_seed(21 + 2 * stride + pad)
    for c, h, w in [(384, 14, 14), (960, 7, 7), (48, 4, 45), (8, 5, 70), (13, 6, 16), (144, 56, 56)]:
        x, wt, b = torch.randn(1, c, h, w, generator=g), torch.randn(c, 1, 3, 3, generator=g), \
            torch.randn(c, generator=g)
        ref = F.conv2d(x, wt, b, stride, pad, groups=c)
        res = _nhwc(torch.randn(ref.shape, generator=g))
        ref = (ref + res).clamp(*native.RELU6)
        layer = native.DepthwiseConv3x3(wt, b, stride, pad)
        for kind in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            outs = []
            for lib in (new, old):
                monkeypatch.setattr(native, "_lib", lib)
                sums = torch.empty(1, c)
                outs.append(layer(_nhwc(x), residual=res, clamp=native.RELU6, out_sums=sums,
                                  out_sums_kind=kind))
                assert rel_err(sums, _sums(ref, kind)) <= 1e-5, (c, h, w, kind)
            _check(outs[0], ref, (c, h, w, stride, pad))
            assert torch.equal(outs[0], outs[1]), (c, h, w, stride, pad)


def test_depthwise_refuses_what_it_does_not_compute():
    with pytest.raises(ConfigError, match=r"\(C, 1, 3, 3\)"):
        native.DepthwiseConv3x3(torch.randn(8, 2, 3, 3))
    with pytest.raises(ConfigError, match="stride"):
        native.DepthwiseConv3x3(torch.randn(8, 1, 3, 3), stride=(1, 2))
    dw = native.DepthwiseConv3x3(torch.randn(8, 1, 3, 3))
    with pytest.raises(DataError, match="channels-last"):
        dw(torch.randn(1, 8, 5, 5))
    with pytest.raises(DataError, match="4 channels, the layer takes 8"):
        dw(_nhwc(torch.randn(1, 4, 5, 5)))


def test_avx2_build_matches_reference(avx2_native):
    lib = avx2_native
    assert lib.ispc_nhwc_max_vectors() == 3
    g = torch.Generator().manual_seed(7)
    for vectors in (1, 2, 3):
        for cin, cout, ks, s, p, h in [(24, 40, 3, 1, 1, 9), (17, 30, 1, 2, 0, 11), (3, 20, 7, 2, 3, 16)]:
            x = torch.randn(2, cin, h, h, generator=g) * (torch.rand(1, cin, 1, 1, generator=g) + .1)
            w, b = torch.randn(cout, cin, ks, ks, generator=g), torch.randn(cout, generator=g)
            scale = torch.rand(cin, generator=g) + 0.5
            layer = native.NhwcConv(w, b, s, p, 1, vectors=vectors)
            thr = threshold_between(gc.channel_saliency(x, scale, gc.SALIENCY_L1), 0.5)
            for mode, t, k, sal in [(native.DENSE, 0.0, 0, 0), (gc.TOPK, 0.0, cin // 2, gc.SALIENCY_L2),
                                    (gc.THRESHOLD, thr, 0, gc.SALIENCY_L1)]:
                ref = _reference(x, w, b, s, p, 1, mode, scale, t, k, sal)
                r = _nhwc(torch.randn(ref.shape, generator=g))
                want = _reference(x, w, b, s, p, 1, mode, scale, t, k, sal, r, native.RELU6)
                out = layer(_nhwc(x), mode, scale=scale, threshold=t, k=k, saliency=sal, residual=r,
                            clamp=native.RELU6)
                _check(out, want, (vectors, cin, mode))
    for c, h, s in [(37, 9, 1), (64, 10, 2), (5, 3, 1), (24, 23, 1), (16, 21, 2)]:
        x, w, b = torch.randn(2, c, h, h, generator=g), torch.randn(c, 1, 3, 3, generator=g), \
            torch.randn(c, generator=g)
        out = native.DepthwiseConv3x3(w, b, s, 1)(_nhwc(x), clamp=native.RELU6)
        _check(out, F.conv2d(x, w, b, s, 1, groups=c).clamp(0, 6), (c, h, s))


def test_tile_choice_prefers_less_waste():
    lib = native._lib
    top = lib.ispc_nhwc_max_vectors()
    lanes = 16 if top == 4 else 8
    if top == 4:  # AVX-512: output channels that fill whole blocks of the widest tile take it
        assert lib.ispc_nhwc_vectors(top * lanes * 4, 56 * 56) == top
    else:  # AVX2: 4x3 only where 6x2 would waste a third of its lanes
        assert lib.ispc_nhwc_vectors(96, 56 * 56) == 2 and lib.ispc_nhwc_vectors(24, 56 * 56) == 3
    # a layer narrower than one vector's lanes takes one vector
    assert lib.ispc_nhwc_vectors(3, 0) == 1
    for cout in (16, 24, 96, 160, 320):
        nv = lib.ispc_nhwc_vectors(cout, 0)
        assert 1 <= nv <= top and math.ceil(cout / (nv * lanes)) * nv * lanes < 2 * cout


def test_avx2_tiles_stream_fewer_weight_bytes(avx2_native):
    # 4x3 reads 1.5x the weight bytes per FMA of 6x2: ResNet-50's layer4 (2048 outputs on 7x7
    # maps) and 96-channel MobileNetV2 layers take 6x2, 24 channels (6x2 wastes 8 lanes) 4x3
    lib = avx2_native
    assert lib.ispc_nhwc_vectors(2048, 49) == 2 and lib.ispc_nhwc_vectors(512, 49) == 2
    assert lib.ispc_nhwc_vectors(96, 196) == 2 and lib.ispc_nhwc_vectors(24, 3136) == 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 512, 7, 7, generator=g).relu() * (torch.rand(1, 512, 1, 1, generator=g) + .1)
    w, b = torch.randn(2048, 512, 1, 1, generator=g) * 0.05, torch.randn(2048, generator=g)
    scale = torch.rand(512, generator=g) + 0.5
    layer = native.NhwcConv(w, b, 1, 0, 1, out_hw=49)
    assert layer.vectors == 2
    for mode, k in [(native.DENSE, 0), (gc.TOPK, 256), (gc.TOPK, 3)]:
        want = _reference(x, w, b, 1, 0, 1, mode, scale, 0.0, k, gc.SALIENCY_L2)
        out = layer(_nhwc(x), mode, scale=scale, k=k, clamp=native.NO_CLAMP)
        _check(out, want, (mode, k))


def _sums(t: torch.Tensor, kind: int) -> torch.Tensor:
    return (t * t if kind == gc.SALIENCY_L2 else t.abs()).double().sum((2, 3)).float()


@pytest.mark.parametrize("kind", [gc.SALIENCY_L2, gc.SALIENCY_L1])
def test_saliency_sums_handed_between_layers(kind):
    # a producer's epilogue computes its output's saliency sums (dense, gated and depthwise, the
    # clamp and residual applied first); a gated consumer given them selects as from the map
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 24, 12, 12, generator=g).relu() * torch.rand(3, 24, 1, 1, generator=g)
    w1, b1 = torch.randn(40, 24, 3, 3, generator=g), torch.randn(40, generator=g)
    w2, b2 = torch.randn(16, 40, 1, 1, generator=g), torch.randn(16, generator=g)
    scale = torch.rand(24, generator=g) + 0.5
    producer, consumer = native.NhwcConv(w1, b1, 1, 1), native.NhwcConv(w2, b2)
    r = _nhwc(torch.randn(3, 40, 12, 12, generator=g))
    for mode, k in [(native.DENSE, 0), (gc.TOPK, 10)]:
        sums = torch.full((3, 40), float("nan"))
        y = producer(_nhwc(x), mode, scale=scale, k=k, residual=r, clamp=native.RELU6, out_sums=sums,
                     out_sums_kind=kind)
        assert rel_err(sums, _sums(y, kind)) <= 1e-5, mode
        s2 = torch.ones(40)
        for m2, thr, k2 in [(gc.TOPK, 0.0, 17), (gc.THRESHOLD,
                                                  threshold_between(gc.channel_saliency(y, s2, kind), .5), 0)]:
            c1, c2 = torch.empty(3, dtype=torch.int64), torch.empty(3, dtype=torch.int64)
            plain = consumer(y, m2, scale=s2, threshold=thr, k=k2, saliency=kind, counts=c1)
            given = consumer(y, m2, scale=s2, threshold=thr, k=k2, saliency=kind, counts=c2,
                             x_sums=sums)
            assert torch.equal(c1, c2) and torch.equal(plain, given), (mode, m2)
    dw = native.DepthwiseConv3x3(torch.randn(24, 1, 3, 3, generator=g), torch.randn(24, generator=g), 2)
    sums = torch.empty(3, 24)
    y = dw(_nhwc(x), clamp=native.RELU6, out_sums=sums, out_sums_kind=kind)
    assert rel_err(sums, _sums(y, kind)) <= 1e-5


def test_saliency_sums_in_chunks_and_refused_shapes(monkeypatch):
    lib = native._build(("-DNHWC_CHUNK_BYTES=1", "-DNHWC_GROUP_BYTES=1"))
    g = torch.Generator().manual_seed(9)
    x = _nhwc(torch.randn(3, 20, 8, 8, generator=g))
    w = torch.randn(50, 20, 3, 3, generator=g)
    monkeypatch.setattr(native, "_lib", lib)
    layer = native.NhwcConv(w, None, 1, 1)
    sums = torch.empty(3, 50)
    y = layer(x, gc.TOPK, scale=torch.ones(20), k=9, out_sums=sums)
    assert rel_err(sums, _sums(y, gc.SALIENCY_L2)) <= 1e-5
    with pytest.raises(DataError, match="out_sums"):
        layer(x, out_sums=torch.empty(3, 49))
    with pytest.raises(DataError, match="x_sums"):
        layer(x, gc.TOPK, scale=torch.ones(20), k=9, x_sums=torch.empty(20))
    with pytest.raises(ConfigError, match="saliency code"):
        layer(x, out_sums=sums, out_sums_kind=3)


def test_strided_dilated_layers_with_every_epilogue_and_sums():
    # strides 1 and 2, padding 0-2, dilated rows, a kept count that fills no whole vector, the
    # residual, the clamp and the output's sums at once
    g = torch.Generator().manual_seed(10)
    for cin, cout, s, p, dh, h, w in [(40, 50, 1, 1, 1, 20, 23), (33, 20, 2, 1, 1, 19, 31),
                                      (64, 64, 1, 2, 2, 15, 16), (17, 70, 2, 0, 1, 16, 33)]:
        x = torch.randn(2, cin, h, w, generator=g).relu() * torch.rand(2, cin, 1, 1, generator=g)
        wt, b = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
        scale = torch.ones(cin)
        thr = threshold_between(gc.channel_saliency(x, scale), 0.6)
        layer = native.NhwcConv(wt, b, s, p, (dh, 1))
        for mode, t, k in [(native.DENSE, 0.0, 0), (gc.TOPK, 0.0, cin // 2 + 1), (gc.TOPK, 0.0, cin),
                           (gc.THRESHOLD, thr, 0)]:
            ref = _reference(x, wt, b, s, p, (dh, 1), mode, scale, t, k, gc.SALIENCY_L2)
            r = _nhwc(torch.randn(ref.shape, generator=g))
            want = _reference(x, wt, b, s, p, (dh, 1), mode, scale, t, k, gc.SALIENCY_L2, r, native.RELU)
            sums = torch.empty(2, cout)
            out = layer(_nhwc(x), mode, scale=scale, threshold=t, k=k, residual=r, clamp=native.RELU,
                        out_sums=sums, out_sums_kind=gc.SALIENCY_L1)
            _check(out, want, (cin, s, p, dh, mode, k))
            assert rel_err(sums, _sums(out, gc.SALIENCY_L1)) <= 1e-5


def _forced_build(flags: tuple[str, ...]):
    try:
        return native._build(flags)
    except RuntimeError as exc:
        pytest.skip(f"cannot build {flags}: {exc}")


@pytest.mark.parametrize("isa", [(), ("-mno-avx512f",)], ids=["native", "avx2"])
@pytest.mark.parametrize("path", [("-DNH_STREAM_BYTES=1",), ("-DNH_GATHER_POSITIONS=1",),
                                  ("-DNH_GATHER_POSITIONS=1", "-DNH_GATHER_TAPS=1"),
                                  ("-DNH_COMPACT_TILES=0", "-DNH_NPF=0"),
                                  ("-DNH_COMPACT_TILES=1", "-DNH_COMPACT_MAX_N=64", "-DNH_NPF_BYTES=0",
                                   "-DNHWC_GROUP_BYTES=1")],
                         ids=["streaming-stores", "gathered", "gathered-1x1", "indirect",
                              "compacted-prefetching"])
def test_forced_paths_equal_the_default_build_bit_for_bit(monkeypatch, isa, path):
    # paths the default build takes only on some layers (streaming stores from 16 MB of output;
    # gathered kept channels and weights on maps of 28x28 and up; the indirect walk over the
    # packed weights where the compaction is off; the next group's rows prefetched on layers
    # past 1.5 MB, here on every layer, one block a group so that threads run several), forced
    # on small ones: the same values as the default build's, bit for bit, and the reference;
    # instances keeping some, all and none
    if isa and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants")
    base, forced = _forced_build(isa), _forced_build(isa + path)
    g = torch.Generator().manual_seed(11)
    for cin, cout, ks, s, p, h in [(24, 64, 3, 1, 1, 9), (40, 48, 1, 1, 0, 13), (17, 32, 1, 2, 0, 11),
                                   (30, 20, 3, 1, 1, 8), (64, 80, 1, 1, 0, 7)]:
        x = torch.randn(4, cin, h, h, generator=g).relu() * torch.rand(4, cin, 1, 1, generator=g)
        x[3] *= 1e-3  # below the threshold in every channel: keeps none
        w, b = torch.randn(cout, cin, ks, ks, generator=g), torch.randn(cout, generator=g)
        scale = torch.rand(cin, generator=g) + 0.5
        thr = threshold_between(gc.channel_saliency(x[:3], scale), 0.5)
        for vectors in range(1, int(base.ispc_nhwc_max_vectors()) + 1):
            for mode, t, k in [(native.DENSE, 0.0, 0), (gc.TOPK, 0.0, cin // 2 + 1), (gc.TOPK, 0.0, cin),
                               (gc.THRESHOLD, thr, 0)]:
                ref = _reference(x, w, b, s, p, 1, mode, scale, t, k, gc.SALIENCY_L2)
                r = _nhwc(torch.randn(ref.shape, generator=g))
                want = _reference(x, w, b, s, p, 1, mode, scale, t, k, gc.SALIENCY_L2,
                                  r if mode == gc.THRESHOLD else None, native.RELU)
                outs, sums = [], []
                for lib in (base, forced):
                    monkeypatch.setattr(native, "_lib", lib)
                    layer = native.NhwcConv(w, b, s, p, vectors=vectors)
                    sums.append(torch.empty(4, cout))
                    # the residual on one mode only (the AVX2 build streams without one)
                    outs.append(layer(_nhwc(x), mode, scale=scale, threshold=t, k=k,
                                      residual=r if mode == gc.THRESHOLD else None,
                                      clamp=native.RELU, out_sums=sums[-1]))
                what = (isa, path, cin, cout, ks, vectors, mode, k)
                _check(outs[1], want, what)
                assert torch.equal(outs[0], outs[1]) and torch.equal(sums[0], sums[1]), what


def test_cache_bytes_read_at_load():
    c = native.cache_bytes()
    assert c["l1d"] >= 16 << 10 and c["l2"] >= 128 << 10


def test_small_l2_build_crosses_the_cache_derived_thresholds(monkeypatch):
    # a build that takes L2 as 256 KiB (-DNH_L2_BYTES): the output-channel groups (a quarter of
    # L2), the gated prefetches and next-group prefetches (three quarters), the selection chunks
    # (half) and Winograd's chunks and output-channel split all cross into their small-L2 values
    # on layers that stay on the other side with the default build: the same values as the
    # default build's (the blocking changes no sum's order) and the reference
    base = native._lib
    small = _forced_build(("-DNH_L2_BYTES=262144",))
    small.ispc_cache_bytes.restype = ctypes.c_int64
    assert small.ispc_cache_bytes(2) == 262144
    g = torch.Generator().manual_seed(21)
    for cin, cout, ks, s, p, h, wino in [(320, 256, 1, 1, 0, 9, False), (256, 128, 3, 1, 1, 7, False),
                                         (96, 80, 3, 1, 1, 10, True), (320, 64, 1, 1, 0, 6, False),
                                         (64, 96, 3, 2, 1, 11, False)]:
        x = torch.randn(3, cin, h, h, generator=g).relu() * (torch.rand(3, cin, 1, 1, generator=g) + .1)
        w = torch.randn(cout, cin, ks, ks, generator=g) / (cin * ks * ks) ** 0.5
        b, scale = torch.randn(cout, generator=g), torch.rand(cin, generator=g) + 0.5
        thr = threshold_between(gc.channel_saliency(x, scale), 0.5)
        for xb in (x[:1], x):
            for mode, t, k in [(native.DENSE, 0.0, 0), (gc.TOPK, 0.0, 3), (gc.TOPK, 0.0, cin // 2),
                               (gc.THRESHOLD, thr, 0)]:
                ref = _reference(xb, w, b, s, p, 1, mode, scale, t, k, gc.SALIENCY_L2)
                r = _nhwc(torch.randn(ref.shape, generator=g))
                outs = []
                for lib in (base, small):
                    monkeypatch.setattr(native, "_lib", lib)
                    layer = native.NhwcConv(w, b, s, p, 1, out_hw=ref.shape[2] * ref.shape[3],
                                            winograd=wino)
                    sums = torch.empty(len(xb), cout)
                    outs.append((layer(_nhwc(xb), mode, scale=scale, threshold=t, k=k, residual=r,
                                       clamp=native.RELU, out_sums=sums), sums))
                what = (cin, cout, ks, len(xb), mode, k)
                _check(outs[1][0], (ref + r).clamp(*native.RELU), what)
                assert rel_err(outs[1][0], outs[0][0]) <= 1e-6, what
                assert rel_err(outs[1][1], outs[0][1]) <= 1e-6, what


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("shape", [
    # (cin, cout, h): blocks of output channels in groups of unequal size (nh_split weighs the
    # threads' runs by blocks): MobileNetV2's 960 -> 160 at 7x7 (3 blocks of 4 vectors in groups
    # of 2 and 1 on AVX-512), 600 -> 300 (5 blocks: 3 and 2), an odd map and channel count
    (960, 160, 7), (600, 300, 7), (961, 150, 5)])
def test_unequal_groups_split_between_threads(threads, n, shape):
    cin, cout, h = shape
    g = torch.Generator().manual_seed(cin + cout + n)
    x = torch.randn(n, cin, h, h, generator=g).relu() * (torch.rand(1, cin, 1, 1, generator=g) + .1)
    wt, b = torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    res = _nhwc(torch.randn(n, cout, h, h, generator=g))
    layer = native.NhwcConv(wt, b, (1, 1), (0, 0), (1, 1), vectors=_max_vectors())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode, k in ((native.DENSE, 0), (gc.TOPK, cin // 2), (gc.TOPK, 1)):
            ref = _reference(x, wt, b, (1, 1), (0, 0), (1, 1), mode, scale, 0.0, k, gc.SALIENCY_L2,
                             res, native.RELU6)
            out = layer(_nhwc(x), mode, scale=scale, k=k, saliency=gc.SALIENCY_L2, residual=res,
                        clamp=native.RELU6)
            _check(out, ref, (mode, k, threads))
    finally:
        torch.set_num_threads(before)
