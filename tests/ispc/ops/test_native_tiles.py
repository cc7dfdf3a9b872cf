"""The register tile NhwcConv chooses for a short reduction (``reduction``: a top-k layer's kept
channels), and that gated layers on it still compute the masked-dense reference."""
from __future__ import annotations

import pytest
import torch

from ispc.modules import GatedConv2d
from ispc.ops import gated_conv as gc
from ispc.ops import native
from conftest import rel_err

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")


def _check(layer: native.NhwcConv, w, b, cin, k, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, cin, h, h, generator=g)
         * (torch.rand(1, cin, 1, 1, generator=g) + 0.1)).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(cin, generator=g) + 0.5
    res = torch.randn(1, w.shape[0], h, h, generator=g).contiguous(memory_format=torch.channels_last)
    got = layer(x, gc.TOPK, scale=scale, k=k, residual=res, clamp=native.RELU)
    ref = (gc.gated_conv2d_reference(x, w, b, scale, 1, 1, 0, 0, 1, 1, gc.TOPK, 0.0, k) + res).relu()
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("cin,cout,h", [
    (64, 256, 56), (128, 512, 28),  # ResNet-50's layer1 and layer2 1x1 layers
    (64, 64, 28), (24, 144, 14), (64, 256, 28)])
def test_short_reductions_choose_a_tile_and_compute_the_reference(cin, cout, h):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
    k = cin // 2
    layer = native.NhwcConv(w, b, out_hw=h * h, reduction=k)
    lib = native._loaded()
    assert 1 <= layer.vectors <= lib.ispc_nhwc_max_vectors()
    assert layer.vectors == lib.ispc_nhwc_vectors(cout, h * h)  # the short rule is off by default
    assert native.NhwcConv(w, b, out_hw=h * h, reduction=1000).vectors \
        == lib.ispc_nhwc_vectors(cout, h * h)  # a long one: the usual choice
    _check(layer, w, b, cin, k, h)
    for nv in range(1, lib.ispc_nhwc_max_vectors() + 1):  # every tile on the short reduction
        _check(native.NhwcConv(w, b, out_hw=h * h, vectors=nv), w, b, cin, k, h, seed=nv)


def test_short_reductions_on_the_avx2_build(avx2_native):
    """AVX2 keeps its usual tiles."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(256, 64, 1, 1, generator=g), torch.randn(256, generator=g)
    layer = native.NhwcConv(w, b, out_hw=28 * 28, reduction=32)
    assert layer.vectors == avx2_native.ispc_nhwc_vectors(256, 28 * 28)
    _check(layer, w, b, 64, 32, 28)


def test_a_top_k_layer_hands_its_k_as_the_reduction():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(256, 64, 1, 1, generator=g), torch.randn(256, generator=g)
    kw = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), mode="topk", threshold=0.0)
    for k, reduction in ((32, 32), (64, None)):  # every channel kept: no hint
        mod = GatedConv2d(w, b, k=k, **kw)
        mod.set_strategy("nhwc", out_hw=28 * 28)
        want = native.NhwcConv(w, b, out_hw=28 * 28, reduction=reduction).vectors
        assert mod._nhwc.vectors == want


def _variant_builds(new_flags: tuple[str, ...], old_flags: tuple[str, ...]):
    """The native library built with ``new_flags`` and with ``old_flags`` (x86 only)."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants")
    try:
        return native._build(new_flags), native._build(old_flags)
    except RuntimeError as exc:
        pytest.skip(f"cannot build the variants: {exc}")


def _same_as_old_build(new, old, monkeypatch, g, *, cin, cout, k, kh=1, stride=1, h, w_, n,
                       clamp=native.RELU6, kinds=(None, gc.SALIENCY_L2, gc.SALIENCY_L1),
                       **layer_kw):
    """One layer shape (padded to keep its size, with a residual and ``clamp``), top-k at ``k``
    and dense, 1 and 2 threads, each output-sums kind: the ``new`` build against the masked-dense
    reference, and bit for bit (outputs and sums) the ``old`` build."""
    x = (torch.randn(n, cin, h, w_, generator=g) * (torch.rand(1, cin, 1, 1, generator=g) + .1)
         ).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, kh, kh, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    pad = kh // 2
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w_ + 2 * pad - kh) // stride + 1
    res = torch.randn(n, cout, ho, wo, generator=g).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        for mode, kk in ((gc.TOPK, k), (native.DENSE, 0)):
            if mode == native.DENSE:
                ref = torch.nn.functional.conv2d(x, w, b, stride, pad)
            else:
                ref = gc.gated_conv2d_reference(x, w, b, scale, stride, stride, pad, pad, 1, 1,
                                                gc.TOPK, 0.0, kk)
            ref = (ref + res).clamp(*clamp)
            for nth in (1, 2):
                torch.set_num_threads(nth)
                for kind in kinds:
                    outs, sums = [], []
                    for lib in (new, old):
                        monkeypatch.setattr(native, "_lib", lib)
                        layer = native.NhwcConv(w, b, stride=stride, padding=pad, **layer_kw)
                        s = None if kind is None else torch.empty(n, cout)
                        outs.append(layer(x, mode, scale=scale, k=kk, residual=res, clamp=clamp,
                                          out_sums=s, out_sums_kind=kind or 0))
                        sums.append(s)
                    case = (cin, cout, k, kh, stride, h, w_, n, mode, nth, kind)
                    assert rel_err(outs[0], ref) < 1e-5, case
                    assert torch.equal(outs[0], outs[1]), case
                    if kind is not None:
                        assert torch.equal(sums[0], sums[1]), case
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("flags", [("-DNH_PW_SHORT=16",), ("-DNH_WS_K=8",), ("-DNH_WS_K=12",)],
                         ids=["tiles", "stationary8", "stationary12"])
def test_avx2_short_pointwise_kernels(flags, monkeypatch):
    # the AVX2 build's 1x1 kernels for short reductions: nh_pw_tile (on by default) and the
    # weights-stationary nh_ws (off); gated and dense, partial channel vectors and blocks, partial last
    # tiles and chunks, the residual, the clamp, with and without output sums, batch 1 and 2, 1 and
    # 2 threads; against the reference, and bit for bit the build without them
    new, old = _variant_builds(("-mno-avx512f", *flags),
                               ("-mno-avx512f", "-DNH_PW_SHORT=0", "-DNH_WS_K=0"))
    g = torch.Generator().manual_seed(5)
    for cin, cout, k, h, w_, n in [(16, 96, 8, 12, 12, 1), (24, 144, 12, 7, 8, 1),
                                   (16, 40, 16, 6, 5, 1), (12, 24, 12, 5, 6, 1),
                                   (32, 96, 16, 9, 4, 1), (40, 64, 20, 6, 6, 1),
                                   (8, 20, 5, 11, 13, 1), (6, 36, 6, 10, 11, 1),
                                   (16, 96, 8, 6, 6, 2)]:
        _same_as_old_build(new, old, monkeypatch, g, cin=cin, cout=cout, k=k, h=h, w_=w_, n=n,
                           vectors=2)


@pytest.mark.parametrize("case", [
    # cin, cout, kernel, stride, h, w, keep, batch: 7x7 outputs (one position left: r = 1), a
    # strided 1x1 (ResNet-50's downsample, small), a padded 3x3, 14x14 (r = 4), r = 2, 3, 5,
    # partial channel vectors and blocks, groups of blocks (large layers), batch 2 (by index)
    (64, 96, 1, 1, 7, 7, 32, 1), (96, 160, 1, 2, 14, 14, 48, 1), (48, 72, 3, 1, 7, 7, 24, 1),
    (40, 56, 1, 1, 14, 14, 20, 1), (32, 48, 1, 1, 2, 4, 16, 1), (32, 40, 3, 1, 3, 3, 16, 1),
    (24, 100, 1, 1, 1, 11, 12, 1), (1024, 1024, 1, 1, 7, 7, 512, 1), (64, 96, 1, 1, 7, 7, 32, 2),
    (512, 256, 3, 1, 7, 7, 256, 1)], ids=str)
def test_avx2_tail_tiles(case, monkeypatch):
    # the AVX2 build's partial last tiles (nh_tail, on by default): gated (compacted and by index)
    # and dense, the residual, the clamp, with and without output sums, 1 and 2 threads; against
    # the reference, and bit for bit the build without them (-DNH_TAIL=0)
    new, old = _variant_builds(("-mno-avx512f",), ("-mno-avx512f", "-DNH_TAIL=0"))
    cin, cout, ks, st, h, w_, k, n = case
    _same_as_old_build(new, old, monkeypatch, torch.Generator().manual_seed(7), cin=cin, cout=cout,
                       k=k, kh=ks, stride=st, h=h, w_=w_, n=n, clamp=native.RELU,
                       kinds=(None, gc.SALIENCY_L2), vectors=2, winograd=False)


@pytest.mark.parametrize("flags", [(), ("-DNH_STREAM_BYTES=1",), ("-DNH_PW512=24",)],
                         ids=["default", "streamed", "short-tile"])
def test_partial_last_blocks(flags, monkeypatch):
    # the AVX-512 build's partial tiles for a last block whose lanes end short (nh_part_kernel:
    # 16 + 8 or 16 lanes of a 2-vector block, 32 of a 4-vector one) and its 1x1 tile for short
    # reductions (nh_pw512_tile, K <= 24, off by default): dense, gated (compacted and indexed
    # weights), 1x1 and a padded strided 3x3, partial position tiles, residual, clamp, output sums,
    # batch 1 and 2, 1 and 2 threads; against the reference, and bit for bit the full tiles
    new, old = _variant_builds(flags, (*flags, "-DNH_PART=0"))
    if new.ispc_vector_floats() != 16:
        pytest.skip("the partial tiles are the AVX-512 build's")
    g = torch.Generator().manual_seed(7)
    for cin, cout, nv, k, kh, stride, h, w_, n in [
            (96, 24, 2, 48, 1, 1, 14, 14, 1), (144, 24, 2, 72, 1, 1, 9, 11, 1),
            (24, 144, 2, 12, 1, 1, 8, 7, 1), (16, 20, 2, 8, 1, 1, 6, 5, 2),
            (16, 8, 2, 8, 1, 1, 7, 6, 1), (96, 160, 4, 48, 1, 1, 7, 7, 1),
            (96, 160, 4, 48, 1, 1, 6, 6, 1), (64, 40, 4, 32, 1, 1, 7, 7, 1),
            (3, 24, 2, 2, 3, 2, 17, 15, 1), (12, 152, 4, 6, 3, 1, 9, 8, 2),
            (16, 96, 2, 8, 1, 1, 12, 12, 1), (24, 144, 2, 12, 1, 1, 14, 14, 1),
            (20, 56, 2, 10, 1, 1, 7, 9, 1), (24, 72, 2, 24, 1, 1, 6, 7, 2)]:
        pad = kh // 2
        ho, wo = (h + 2 * pad - kh) // stride + 1, (w_ + 2 * pad - kh) // stride + 1
        _same_as_old_build(new, old, monkeypatch, g, cin=cin, cout=cout, k=k, kh=kh, stride=stride,
                           h=h, w_=w_, n=n, out_hw=ho * wo, vectors=nv)
