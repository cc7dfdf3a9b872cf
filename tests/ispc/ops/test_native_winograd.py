"""Winograd F(2x2, 3x3) in ``native.NhwcConv`` (3x3 stride-1 layers) equals the masked-dense
reference: dense and gated, both modes, every register tile, odd sizes, padding 0 and 1, fused
epilogues, output sums, batches, chunks, large C, programs, pickles and the AVX2 build."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, threshold_between
from ispc.errors import ConfigError
from ispc.ops import gated_conv as gc
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")

CLAMPS = [native.NO_CLAMP, native.RELU, native.RELU6]


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _masked(x, scale, mode, thr, k, sal):
    if mode == native.DENSE:
        return x
    m = gc.channel_mask(x, scale, mode, thr, k, sal)
    return torch.where(m[:, :, None, None], x, torch.zeros((), dtype=x.dtype))


def _reference(x, w, b, pad, mode, scale, thr, k, sal, res=None, clamp=native.NO_CLAMP):
    """conv2d (float64) of x with each instance's dropped channels zeroed, + residual, clamped."""
    out = F.conv2d(_masked(x, scale, mode, thr, k, sal).double(), w.double(), b.double(), 1, pad)
    if res is not None:
        out = out + res.double()
    return (out.clamp(*clamp) if clamp != native.NO_CLAMP else out).float()


def _layer(cin, cout, g, scale_w=True):
    w = torch.randn(cout, cin, 3, 3, generator=g)
    return (w / (9 * cin) ** 0.5 if scale_w else w), torch.randn(cout, generator=g)


def _max_vectors() -> int:
    return int(native._lib.ispc_nhwc_max_vectors())


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 40), cout=st.integers(1, 70), h=st.integers(1, 13),
       w=st.integers(1, 13), pad=st.integers(0, 1), mode=st.sampled_from([native.DENSE, gc.TOPK,
                                                                           gc.THRESHOLD]),
       keep=st.floats(0.0, 1.0), sal=st.sampled_from([gc.SALIENCY_L2, gc.SALIENCY_L1]),
       residual=st.booleans(), clamp=st.sampled_from(CLAMPS), vectors=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_random_sizes_match_reference(n, cin, cout, h, w, pad, mode, keep, sal, residual, clamp,
                                      vectors, seed):
    if min(h, w) + 2 * pad < 3:
        return  # no output position
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g) * (torch.rand(1, cin, 1, 1, generator=g) + 0.1)
    wt, b = _layer(cin, cout, g)
    scale = torch.rand(cin, generator=g) + 0.5
    thr, k = 0.0, int(round(keep * cin))
    if mode == gc.THRESHOLD:
        thr = threshold_between(gc.channel_saliency(x, scale, sal), keep)
    layer = native.NhwcConv(wt, b, 1, pad, vectors=min(vectors, _max_vectors()), winograd=True)
    assert layer.winograd
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    res = _nhwc(torch.randn(n, cout, ho, wo, generator=g)) if residual else None
    ref = _reference(x, wt, b, pad, mode, scale, thr, k, sal, res, clamp)
    counts = torch.empty(n, dtype=torch.int64)
    out = layer(_nhwc(x), mode, scale=scale, threshold=thr, k=k, saliency=sal, residual=res,
                clamp=clamp, counts=counts)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= 1e-5, (mode, k, thr, layer.vectors)
    if mode != native.DENSE:
        assert torch.equal(counts, gc.channel_mask(x, scale, mode, thr, k, sal).sum(1))


@pytest.mark.parametrize("vectors", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(64, 64, 56), (128, 128, 28), (96, 80, 15), (256, 256, 14),
                                   (512, 512, 7)])
def test_resnet_shapes_every_tile(vectors, shape):
    # ResNet's stride-1 3x3 layers (and odd ones), where groups of tiles and of output blocks split
    if vectors > _max_vectors():
        pytest.skip(f"this build's widest tile has {_max_vectors()} vectors")
    cin, cout, h = shape
    g = torch.Generator().manual_seed(cin + h)
    x = torch.randn(2, cin, h, h, generator=g).relu() * (torch.rand(2, cin, 1, 1, generator=g) + .1)
    wt, b = _layer(cin, cout, g)
    scale = torch.rand(cin, generator=g) + 0.5
    layer = native.NhwcConv(wt, b, 1, 1, vectors=vectors, winograd=True)
    r = _nhwc(torch.randn(2, cout, h, h, generator=g))
    for mode, k in [(native.DENSE, 0), (gc.TOPK, cin // 2), (gc.TOPK, cin - 1)]:
        for res, clamp in [(None, native.NO_CLAMP), (r, native.RELU)]:
            want = _reference(x, wt, b, 1, mode, scale, 0.0, k, gc.SALIENCY_L2, res, clamp)
            out = layer(_nhwc(x), mode, scale=scale, k=k, residual=res, clamp=clamp)
            assert rel_err(out, want) <= 1e-5, (mode, k, clamp)


def test_large_channels_unscaled_weights_within_the_contract():
    # C = 512: 4608 products a sum with weights of unit variance, the transforms' rounding added
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 512, 14, 14, generator=g)
    wt, b = _layer(512, 512, g, scale_w=False)
    layer = native.NhwcConv(wt, b, 1, 1, winograd=True)
    scale = torch.rand(512, generator=g) + 0.5
    thr = threshold_between(gc.channel_saliency(x, scale, gc.SALIENCY_L2), 0.5)
    for mode, k in [(native.DENSE, 0), (gc.TOPK, 256), (gc.THRESHOLD, 0)]:
        want = _reference(x, wt, b, 1, mode, scale, thr, k, gc.SALIENCY_L2)
        out = layer(_nhwc(x), mode, scale=scale, threshold=thr, k=k)
        assert rel_err(out, want) <= 1e-5, mode


def test_every_channel_kept_equals_dense_and_the_direct_kernel():
    g = torch.Generator().manual_seed(4)
    x = _nhwc(torch.randn(3, 48, 17, 16, generator=g))
    wt, b = _layer(48, 40, g)
    wino = native.NhwcConv(wt, b, 1, 1, winograd=True)
    direct = native.NhwcConv(wt, b, 1, 1, winograd=False)
    dense = wino(x)
    assert torch.equal(wino(x, gc.TOPK, scale=torch.ones(48), k=48), dense)
    assert rel_err(dense, direct(x)) <= 1e-5
    assert rel_err(dense, F.conv2d(x, wt, b, 1, 1)) <= 1e-5


def test_nan_in_a_dropped_channel_does_not_reach_the_output():
    # threshold mode drops a channel whose saliency is NaN; the transform reads it, the sums not
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 9, 9, generator=g).abs() + 0.1
    x[1, 3, 4, 4] = float("nan")
    wt, b = _layer(16, 24, g)
    layer = native.NhwcConv(wt, b, 1, 1, winograd=True)
    scale = torch.ones(16)
    thr = threshold_between(gc.channel_saliency(x[:1], scale, gc.SALIENCY_L2), 0.5)
    want = _reference(x, wt, b, 1, gc.THRESHOLD, scale, thr, 0, gc.SALIENCY_L2)
    out = layer(_nhwc(x), gc.THRESHOLD, scale=scale, threshold=thr)
    assert not want.isnan().any() and not out.isnan().any() and rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("mode", [native.DENSE, gc.TOPK])
def test_non_finite_input_in_a_kept_channel_gives_the_reference_non_finite_outputs(value, mode):
    # the transforms subtract: an inf would become NaN in outputs whose direct sum is inf, so
    # a chunk whose transformed input is not finite is summed directly (top-k keeps the channel:
    # its saliency is inf or NaN, the highest)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 32, 28, 29, generator=g)
    x[0, 3, 10, 10] = value
    x[1, 5, 0, 28] = value
    wt, b = _layer(32, 40, g)
    scale = torch.ones(32)
    layer = native.NhwcConv(wt, b, 1, 1, winograd=True)
    out = layer(_nhwc(x), mode, scale=scale, k=16, residual=_nhwc(torch.ones(2, 40, 28, 29)),
                clamp=native.RELU)
    want = _reference(x, wt, b, 1, mode, scale, 0.0, 16, gc.SALIENCY_L2,
                      res=torch.ones(2, 40, 28, 29), clamp=native.RELU)
    assert not want.isfinite().all()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    fin = want.isfinite()
    assert rel_err(out[fin], want[fin]) <= 1e-5


def test_output_sums_and_sums_handed_in():
    g = torch.Generator().manual_seed(6)
    x = _nhwc(torch.randn(3, 32, 14, 14, generator=g).relu())
    wt, b = _layer(32, 48, g)
    layer = native.NhwcConv(wt, b, 1, 1, winograd=True)
    scale = torch.rand(32, generator=g) + 0.5
    for kind in (gc.SALIENCY_L2, gc.SALIENCY_L1):
        for mode, k in [(native.DENSE, 0), (gc.TOPK, 12)]:
            sums = torch.full((3, 48), float("nan"))
            y = layer(x, mode, scale=scale, k=k, clamp=native.RELU6, out_sums=sums,
                      out_sums_kind=kind)
            want = (y * y if kind == gc.SALIENCY_L2 else y.abs()).double().sum((2, 3)).float()
            assert rel_err(sums, want) <= 1e-5, (kind, mode)
        xs = (x * x if kind == gc.SALIENCY_L2 else x.abs()).double().sum((2, 3)).float()
        plain = layer(x, gc.TOPK, scale=scale, k=12, saliency=kind)
        assert torch.equal(layer(x, gc.TOPK, scale=scale, k=12, saliency=kind, x_sums=xs), plain)


@pytest.mark.parametrize("flags", [("-DNHWC_CHUNK_BYTES=1", "-DWINO_TILE_FLOATS=1"),
                                   ("-DWINO_COUT_SPLIT_BYTES=1", "-DWINO_SPLIT_FLOATS=1")])
def test_chunks_and_splits_do_not_change_results(monkeypatch, flags):
    # chunks of one register tile; the threads splitting the output channels (each its share of
    # the blocks, the output sums of its own channels) instead of the positions
    g = torch.Generator().manual_seed(7)
    x = _nhwc(torch.randn(3, 40, 12, 11, generator=g))
    wt, b = _layer(40, 70, g)
    scale = torch.rand(40, generator=g) + 0.5
    cases = [(native.DENSE, 0), (gc.TOPK, 20)]
    want = [native.NhwcConv(wt, b, 1, 1, winograd=True)(x, m, scale=scale, k=k) for m, k in cases]
    monkeypatch.setattr(native, "_lib", native._build(flags))
    layer = native.NhwcConv(wt, b, 1, 1, vectors=1, winograd=True)  # 70 channels: 5 or 9 blocks
    for (m, k), w0 in zip(cases, want):
        sums = torch.empty(3, 70)
        out = layer(x, m, scale=scale, k=k, clamp=native.RELU, out_sums=sums)
        assert rel_err(out, w0.clamp_min(0)) <= 1e-6
        assert rel_err(out, _reference(x, wt, b, 1, m, scale, 0.0, k, gc.SALIENCY_L2,
                                       clamp=native.RELU)) <= 1e-5
        assert rel_err(sums, (out * out).double().sum((2, 3)).float()) <= 1e-5


def test_program_runs_the_winograd_layer():
    g = torch.Generator().manual_seed(8)
    n, h, w = 2, 28, 28
    x = _nhwc(torch.randn(n, 32, h, w, generator=g).relu())
    wt, b = _layer(32, 32, g)
    layer = native.NhwcConv(wt, b, 1, 1, out_hw=h * w)
    assert layer.winograd  # chosen from 28x28 outputs up
    scale = torch.rand(32, generator=g) + 0.5
    want = layer(x, gc.TOPK, scale=scale, k=16, residual=x, clamp=native.RELU)
    prog = native.OpProgram()
    prog.add_conv(layer, 0, 1, (n, 32, h, w), gc.TOPK, scale, 0.0, 16, gc.SALIENCY_L2, res=0,
                  clamp=native.RELU)
    bufs = [x, torch.empty_like(want)]
    slots = native.OpProgram.slot_array(len(bufs))
    for i, t in enumerate(bufs):
        slots[i] = t.data_ptr()
    prog.run(slots)
    assert torch.equal(bufs[1], want)


def test_choice_refusal_and_pickles(monkeypatch):
    monkeypatch.setattr(native, "narrow_fmas", lambda: False)  # full-width limits
    w = torch.randn(32, 32, 3, 3)
    assert native.NhwcConv(w, None, 1, 1, out_hw=784).winograd
    assert not native.NhwcConv(w, None, 1, 1, out_hw=196).winograd  # 14x14: U read per chunk
    assert not native.NhwcConv(w, None, 1, 1, out_hw=49).winograd  # 7x7: weight-bound, direct
    assert not native.NhwcConv(w, None, 1, 1).winograd
    assert native.NhwcConv(torch.randn(64, 32, 3, 3), None, 1, 1, out_hw=3136).winograd
    assert not native.NhwcConv(torch.randn(64, 3, 3, 3), None, 1, 1, out_hw=50176).winograd  # a stem
    assert not native.NhwcConv(torch.randn(256, 256, 3, 3), None, 1, 1, out_hw=3136).winograd  # 4 MB U
    assert not native.NhwcConv(w, None, 2, 1, out_hw=3136).winograd
    assert not native.NhwcConv(torch.randn(8, 8, 1, 1), out_hw=3136).winograd
    with pytest.raises(ConfigError, match="winograd=True needs"):
        native.NhwcConv(w, None, 2, 1, winograd=True)
    layer = native.NhwcConv(w, torch.randn(32), 1, 0, winograd=True)
    assert torch.equal(layer.weight(), w)
    state = layer.__getstate__()
    assert "_wino" not in state  # derived from the weights: rebuilt, never stored
    x = _nhwc(torch.randn(2, 32, 9, 7))
    back = pickle.loads(pickle.dumps(layer))
    assert back.winograd and torch.equal(back(x), layer(x))


def test_avx2_build_matches_reference(avx2_native):
    # the last layer's U (1.5 MB) splits the output channels between the threads
    g = torch.Generator().manual_seed(9)
    for cin, cout, h, pad in [(64, 64, 14, 1), (40, 70, 9, 0), (24, 20, 7, 1), (256, 96, 9, 1)]:
        x = torch.randn(2, cin, h, h + 1, generator=g).relu() + 0.01
        wt, b = _layer(cin, cout, g)
        scale = torch.rand(cin, generator=g) + 0.5
        for vectors in range(1, _max_vectors() + 1):
            layer = native.NhwcConv(wt, b, 1, pad, vectors=vectors, winograd=True)
            for mode, k in [(native.DENSE, 0), (gc.TOPK, cin // 2)]:
                want = _reference(x, wt, b, pad, mode, scale, 0.0, k, gc.SALIENCY_L2)
                out = layer(_nhwc(x), mode, scale=scale, k=k, clamp=native.NO_CLAMP)
                assert rel_err(out, want) <= 1e-5, (cin, vectors, mode)


def test_half_width_avx512_chooses_14x14_and_u_to_4_mb(monkeypatch):
    # where AVX-512 runs on 256-bit datapaths (AMD Zen 4) Winograd runs down to 14x14 maps and
    # up to 256 -> 256 channels (U 4 MB); 7x7 maps and larger U stay direct
    assert isinstance(native.avx512_half_width(), bool)  # this CPU's, from /proc/cpuinfo
    monkeypatch.setattr(native, "avx512_half_width", lambda: True)
    assert native.winograd_chosen(256, 256, 196) and native.winograd_chosen(32, 32, 196)
    assert native.winograd_chosen(256, 256, 3136)
    assert not native.winograd_chosen(256, 257, 196)  # U past 4 MB
    assert not native.winograd_chosen(512, 512, 196)
    assert not native.winograd_chosen(256, 256, 195) and not native.winograd_chosen(256, 256, 49)
    assert not native.winograd_chosen(16, 256, 196)  # too few input channels
    assert native.NhwcConv(torch.randn(256, 256, 3, 3), None, 1, 1, out_hw=196).winograd
    monkeypatch.setattr(native, "avx512_half_width", lambda: False)
    monkeypatch.setattr(native, "vector_floats", lambda: 16)  # a full-width AVX-512 build
    assert not native.NhwcConv(torch.randn(256, 256, 3, 3), None, 1, 1, out_hw=196).winograd


def test_avx2_build_takes_the_narrow_limits_on_any_cpu(avx2_native, monkeypatch):
    # an AVX2 build's FMAs are 256 bits wide whatever the CPU (a Zen 2/3 has no avx512f to key
    # on): Winograd from 14x14 maps with U to 4 MB, 7x7 maps and larger U direct; the chosen
    # layer, dense and gated, equals the reference
    monkeypatch.setattr(native, "avx512_half_width", lambda: False)
    assert native.vector_floats() == 8 and native.narrow_fmas()
    assert native.winograd_chosen(256, 256, 196) and native.winograd_chosen(64, 64, 3136)
    assert not native.winograd_chosen(256, 256, 49) and not native.winograd_chosen(512, 512, 196)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(1, 256, 14, 14, generator=g).relu() * (torch.rand(1, 256, 1, 1, generator=g) + 0.1)
    wt, b = _layer(256, 256, g)
    scale = torch.rand(256, generator=g) + 0.5
    layer = native.NhwcConv(wt, b, 1, 1, out_hw=196)
    assert layer.winograd and not native.NhwcConv(wt, b, 1, 1, out_hw=49).winograd
    thr = threshold_between(gc.channel_saliency(x, scale), 0.5)
    for mode, t, k in [(native.DENSE, 0.0, 0), (gc.TOPK, 0.0, 128), (gc.THRESHOLD, thr, 0)]:
        want = _reference(x, wt, b, 1, mode, scale, t, k, gc.SALIENCY_L2)
        out = layer(_nhwc(x), mode, scale=scale, threshold=t, k=k, clamp=native.NO_CLAMP)
        assert rel_err(out, want) <= 1e-5, mode


@pytest.mark.parametrize("n", [1, 2])
def test_split_u_past_l2_prefetched_gated_matches_reference(n):
    # ResNet's 256 -> 256 layer at 14x14 (U 4 MB: the threads split its blocks, and a gated call
    # prefetches its kept rows), kept counts below and above the prefetch distance, both modes,
    # residual and output sums; every channel kept equals the dense mode
    g = torch.Generator().manual_seed(12 + n)
    x = _nhwc(torch.randn(n, 256, 14, 14, generator=g).relu()
              * (torch.rand(n, 256, 1, 1, generator=g) + 0.1))
    wt, b = _layer(256, 256, g)
    scale = torch.rand(256, generator=g) + 0.5
    res = _nhwc(torch.randn(n, 256, 14, 14, generator=g))
    layer = native.NhwcConv(wt, b, 1, 1, out_hw=196, winograd=True)
    thr = threshold_between(gc.channel_saliency(x, scale), 0.5)
    for mode, t, k in [(gc.TOPK, 0.0, 1), (gc.TOPK, 0.0, 7), (gc.TOPK, 0.0, 9), (gc.TOPK, 0.0, 128),
                       (gc.THRESHOLD, thr, 0)]:
        sums = torch.empty(n, 256)
        out = layer(x, mode, scale=scale, threshold=t, k=k, residual=res, clamp=native.RELU,
                    out_sums=sums)
        want = _reference(x, wt, b, 1, mode, scale, t, k, gc.SALIENCY_L2, res, native.RELU)
        assert rel_err(out, want) <= 1e-5, (mode, k)
        assert rel_err(sums, (out * out).double().sum((2, 3)).float()) <= 1e-5
    dense = layer(x, native.DENSE, residual=res, clamp=native.RELU)
    assert torch.equal(layer(x, gc.TOPK, scale=scale, k=256, residual=res, clamp=native.RELU), dense)


def _poison_workspace():
    # every float of this thread's scratch (V, M, the sums' buffer) NaN: a value read from a part
    # of it that the call did not fill would reach the output as NaN
    ws = getattr(native._local, "ws", None)
    if ws is not None:
        ws.fill_(float("nan"))


@pytest.mark.parametrize("build", ["default", "avx2"])
@pytest.mark.parametrize("shape", [(32, 40, 28, 29), (256, 256, 14, 14)])
@pytest.mark.parametrize("mode", [native.DENSE, gc.TOPK, gc.THRESHOLD])
def test_non_finite_chunks_read_no_unfilled_scratch(request, build, shape, mode):
    # nh_wino's non-finite path (a chunk summed directly, its GEMMs skipped) through an output
    # transform that never reads the chunk's M, nor the scratch's stale values: the workspace
    # poisoned with NaN gives the reference's values, inf where it has inf, NaN only where it has
    # NaN, and the output sums of the values stored (C = 256 at 14x14: the threads split U's
    # blocks, its 49 tiles in chunks of two tiles' sizes; threshold mode drops a NaN channel)
    if build == "avx2":
        request.getfixturevalue("avx2_native")
    cin, cout, h, w = shape
    g = torch.Generator().manual_seed(cin + h)
    x = torch.randn(2, cin, h, w, generator=g).abs() + 0.1
    x[0, 3, h // 2, w // 3] = float("inf")  # a kept channel's (the highest saliency)
    x[1, 5, 0, w - 1] = -float("inf") if mode != gc.THRESHOLD else float("nan")
    wt, b = _layer(cin, cout, g)
    scale = torch.ones(cin)
    layer = native.NhwcConv(wt, b, 1, 1, out_hw=h * w, winograd=True)
    thr = threshold_between(gc.channel_saliency(x[:1], scale, gc.SALIENCY_L2), 0.5)
    res = _nhwc(torch.randn(2, cout, h, w, generator=g))
    kw = dict(scale=scale, threshold=thr, k=cin // 2, residual=res, clamp=native.RELU)
    layer(_nhwc(x), mode, **kw)  # the workspace at this call's size
    _poison_workspace()
    sums = torch.empty(2, cout)
    out = layer(_nhwc(x), mode, out_sums=sums, **kw)
    want = _reference(x, wt, b, 1, mode, scale, thr, cin // 2, gc.SALIENCY_L2, res, native.RELU)
    assert not want.isfinite().all()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    fin = want.isfinite()
    assert rel_err(out[fin], want[fin]) <= 1e-5
    want_sums = (out * out).double().sum((2, 3)).float()
    assert torch.equal(sums.isfinite(), want_sums.isfinite())
    ok = want_sums.isfinite()
    assert rel_err(sums[ok], want_sums[ok]) <= 1e-5


@pytest.mark.parametrize("flags", [(), ("-DWINO_TILE_FLOATS=8192",), ("-DWINO_SPLIT_FLOATS=8192",
                                                                         "-DWINO_COUT_SPLIT_BYTES=1")])
def test_avx2_chunks_of_either_tile_match_reference(monkeypatch, flags):
    # the AVX2 build's Winograd GEMMs in groups of 6 or 5 tiles, each chunk the tile that
    # computes the fewest (the last two chunks of a run split to suit them): maps from 3 to 49
    # tiles a thread, small chunks and split blocks, dense and gated, over a poisoned workspace
    try:
        lib = native._build(("-mno-avx512f", *flags))
    except RuntimeError as exc:
        pytest.skip(f"cannot build the AVX2 variant: {exc}")
    monkeypatch.setattr(native, "_lib", lib)
    g = torch.Generator().manual_seed(len(flags) + 31)
    for cin, cout, h in [(48, 32, 5), (40, 16, 11), (64, 48, 14), (32, 40, 19), (48, 16, 27)]:
        x = torch.randn(1, cin, h, h + 1, generator=g).relu() + 0.01
        wt, b = _layer(cin, cout, g)
        scale = torch.rand(cin, generator=g) + 0.5
        layer = native.NhwcConv(wt, b, 1, 1, vectors=2, winograd=True)
        for mode, k in [(native.DENSE, 0), (gc.TOPK, cin // 2)]:
            layer(_nhwc(x), mode, scale=scale, k=k)
            _poison_workspace()
            out = layer(_nhwc(x), mode, scale=scale, k=k)
            want = _reference(x, wt, b, 1, mode, scale, 0.0, k, gc.SALIENCY_L2)
            assert rel_err(out, want) <= 1e-5, (cin, h, mode, flags)
