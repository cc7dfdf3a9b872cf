"""native.OpProgram runs channels-last layers in one C call with the results of their own calls."""
from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ispc.errors import IspcError
from ispc.ops import gated_conv as gc
from ispc.ops import native
from conftest import rel_err

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _chain(seed: int, n: int, h: int, w: int, c: int, *, stem_stride: int):
    """An input and a MobileNet-like chain on it: a 3x3 stem to ``c`` channels, a depthwise 3x3,
    a 1x1, and the 1x1's saliency scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    stem = native.NhwcConv(torch.randn(c, 3, 3, 3, generator=g), torch.randn(c, generator=g),
                           stem_stride, 1)
    dw = native.DepthwiseConv3x3(torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g))
    pw = native.NhwcConv(torch.randn(c, c, 1, 1, generator=g), torch.randn(c, generator=g))
    return x, stem, dw, pw, torch.rand(c, generator=g) + 0.5


def test_a_chain_equals_its_layers_called_one_by_one():
    n, h, w = 2, 18, 14
    x, stem, dw, pw, scale = _chain(0, n, h, w, 24, stem_stride=2)

    # one by one, as the modules call them
    a = native.to_channels_last(x)
    b = stem(a, clamp=native.RELU6)
    sums = torch.empty(n, 24)
    c = dw(b, clamp=native.RELU6, out_sums=sums, out_sums_kind=gc.SALIENCY_L1)
    d = pw(c, gc.TOPK, scale=scale, k=9, saliency=gc.SALIENCY_L1, residual=b, x_sums=sums)
    e = native.maxpool_nhwc(d, (3, 3), (2, 2), (1, 1), native.RELU)
    f = native.avgpool_global_nhwc(e)

    prog = native.OpProgram()
    prog.add_to_channels_last(0, 1, (n, 3, h, w))
    prog.add_conv(stem, 1, 2, (n, 3, h, w), clamp=native.RELU6)
    ho, wo = b.shape[-2:]
    prog.add_depthwise(dw, 2, 3, (n, 24, ho, wo), clamp=native.RELU6, sums_out=7,
                       sums_kind=gc.SALIENCY_L1)
    prog.add_conv(pw, 3, 4, (n, 24, ho, wo), gc.TOPK, scale, 0.0, 9, gc.SALIENCY_L1, res=2,
                  sums_in=7)
    prog.add_maxpool(4, 5, (n, 24, ho, wo), (3, 3), (2, 2), (1, 1), native.RELU)
    prog.add_avgpool_global(5, 6, (n, 24, *e.shape[-2:]))
    assert len(prog) == 6
    bufs = [x] + [torch.empty_like(t) for t in (a, b, c, d, e, f)] + [torch.empty(n, 24)]
    slots = native.OpProgram.slot_array(len(bufs))
    for i, t in enumerate(bufs):
        slots[i] = t.data_ptr()
    for _ in range(2):
        prog.run(slots)
        for got, want in zip(bufs[1:7], (a, b, c, d, e, f)):
            assert torch.equal(got.reshape(-1), want.reshape(-1))
        assert torch.equal(bufs[7], sums)


def test_chunked_runs_on_the_avx2_build(avx2_native):
    test_a_chain_equals_its_layers_called_one_by_one()
    test_chunked_runs_equal_their_layers_chunk_by_chunk()


def test_chunked_runs_equal_their_layers_chunk_by_chunk():
    """Ops 0-3 one instance at a time (the maps between them in one-instance buffers), ops 4-5
    two at a time: each chunk as the layers' own calls on it."""
    n, h, w = 4, 12, 10
    x, stem, dw, pw, scale = _chain(1, n, h, w, 16, stem_stride=1)

    want = {k: [] for k in "def"}
    sums = torch.empty(n, 16)
    for i in range(n):
        a = native.to_channels_last(x[i:i + 1])
        b = stem(a, clamp=native.RELU6)
        c = dw(b, clamp=native.RELU6, out_sums=sums[i:i + 1], out_sums_kind=gc.SALIENCY_L2)
        want["d"].append(pw(c, gc.TOPK, scale=scale, k=7, residual=b, x_sums=sums[i:i + 1]))
    d = torch.cat(want["d"])
    for i in range(0, n, 2):
        want["e"].append(native.maxpool_nhwc(d[i:i + 2], (2, 2), (2, 2), (0, 0)))
        want["f"].append(native.avgpool_global_nhwc(want["e"][-1]))
    e, f = torch.cat(want["e"]), torch.cat(want["f"])

    prog = native.OpProgram()
    prog.add_to_channels_last(0, 1, (n, 3, h, w))
    prog.add_conv(stem, 1, 2, (n, 3, h, w), clamp=native.RELU6)
    prog.add_depthwise(dw, 2, 3, (n, 16, h, w), clamp=native.RELU6, sums_out=7)
    prog.add_conv(pw, 3, 4, (n, 16, h, w), gc.TOPK, scale, 0.0, 7, gc.SALIENCY_L2, res=2, sums_in=7)
    prog.add_maxpool(4, 5, (n, 16, h, w), (2, 2), (2, 2), (0, 0))
    prog.add_avgpool_global(5, 6, (n, 16, h // 2, w // 2))
    for i, local in enumerate([("out",), ("x", "out"), ("x", "out"), ("x", "res")]):
        prog.set_chunk(i, 1, local)
    prog.set_chunk(4, 2)
    prog.set_chunk(5, 2)
    assert prog.chunks() == [1, 1, 1, 1, 2, 2]
    one = [torch.empty(3 * h * w), torch.empty(16 * h * w), torch.empty(16 * h * w)]  # a, b, c
    bufs = [x, *one, torch.empty_like(d), torch.empty_like(e), torch.empty_like(f), torch.empty(n, 16)]
    slots = native.OpProgram.slot_array(len(bufs))
    for i, t in enumerate(bufs):
        slots[i] = t.data_ptr()
    for _ in range(2):
        prog.run(slots)
        assert torch.equal(bufs[4], d) and torch.equal(bufs[5], e) and torch.equal(bufs[6], f)
        assert torch.equal(bufs[7], sums)
    with pytest.raises(native.ConfigError, match="local"):
        prog.set_chunk(0, 1, ("y",))


def test_per_op_times_add_up():
    g = torch.Generator().manual_seed(2)
    dw = native.DepthwiseConv3x3(torch.randn(8, 1, 3, 3, generator=g))
    x = _nhwc(torch.randn(2, 8, 9, 9, generator=g))
    prog = native.OpProgram()
    prog.add_depthwise(dw, 0, 1, (2, 8, 9, 9))
    prog.add_avgpool_global(1, 2, (2, 8, 9, 9))
    out, pooled = torch.empty_like(x), torch.empty(2, 8)
    slots = native.OpProgram.slot_array(3)
    for i, t in enumerate((x, out, pooled)):
        slots[i] = t.data_ptr()
    times = torch.zeros(2, dtype=torch.float64)
    prog.run(slots, times)
    assert (times > 0).all() and times.sum() < 10
    assert torch.equal(out, dw(x)) and torch.equal(pooled, native.avgpool_global_nhwc(out).reshape(2, 8))
    with pytest.raises(native.DataError, match="float64"):
        prog.run(slots, torch.zeros(3, dtype=torch.float64))


def test_to_channels_last_refuses_many_channels():
    with pytest.raises(native.ConfigError, match="at most"):
        native.OpProgram().add_to_channels_last(0, 1, (1, 64, 4, 4))


def _expand_dw_case(n, c, e, h, w, stride, mode, seed=3, sums=True, by_channels=False, res=False,
                    vectors=None, kernel=1, first_stride=1):
    """add_expand_dw against the 1x1 layer's and the depthwise layer's own calls (the output sums
    within float rounding where by_channels: each channel summed over rows by one thread)."""
    g = torch.Generator().manual_seed(seed)
    x = _nhwc(torch.randn(n, c, h, w, generator=g))
    pw = native.NhwcConv(torch.randn(e, c, kernel, kernel, generator=g), torch.randn(e, generator=g),
                         stride=first_stride, padding=kernel // 2,
                         **({} if vectors is None else {"vectors": vectors}))
    dw = native.DepthwiseConv3x3(torch.randn(e, 1, 3, 3, generator=g), torch.randn(e, generator=g),
                                 stride=stride)
    scale = torch.rand(c, generator=g) + 0.5
    k = max(1, c // 2)
    xs = torch.empty(n, c)  # the input's sums, as a layer before would hand them over
    for i in range(n):
        xs[i] = x[i].square().sum((1, 2))
    gated = mode != native.DENSE
    mid = pw(x, mode, scale=scale if gated else None, k=k, clamp=native.RELU6,
             x_sums=xs if gated else None)
    want_sums = torch.empty(n, e)
    r = _nhwc(torch.randn(n, e, *dw.out_size(*pw.out_size(h, w)), generator=g)) if res else None
    want = dw(mid, residual=r, clamp=native.RELU6, out_sums=want_sums if sums else None,
              out_sums_kind=gc.SALIENCY_L1)
    prog = native.OpProgram()
    prog.add_expand_dw(pw, dw, 0, 1, (n, c, h, w), mode, scale if gated else None, 0.0, k,
                       gc.SALIENCY_L2, native.RELU6, native.RELU6, res=4 if res else -1,
                       sums_in=3 if gated else -1, sums_out=2 if sums else -1,
                       sums_kind=gc.SALIENCY_L1, by_channels=by_channels)
    out, got_sums = torch.empty_like(want), torch.empty(n, e)
    slots = native.OpProgram.slot_array(5)
    for i, t in enumerate((x, out, got_sums, xs, r if res else x)):
        slots[i] = t.data_ptr()
    for _ in range(2):
        prog.run(slots)
        assert torch.equal(out, want)
        if sums and by_channels:
            torch.testing.assert_close(got_sums, want_sums, rtol=1e-6, atol=0)
        elif sums:
            assert torch.equal(got_sums, want_sums)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", [native.DENSE, gc.TOPK])
@pytest.mark.parametrize("shape", [(2, 8, 24, 11, 9), (3, 24, 144, 30, 28), (1, 16, 40, 1, 5)])
def test_expand_dw_equals_its_two_layers(shape, stride, mode):
    _expand_dw_case(*shape, stride, mode)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", [native.DENSE, gc.TOPK])
@pytest.mark.parametrize("shape", [(2, 8, 24, 11, 9), (3, 24, 144, 14, 14), (1, 16, 40, 1, 5),
                                   (1, 160, 960, 7, 7), (2, 12, 20, 6, 7)])
def test_expand_dw_by_channels_equals_its_two_layers(shape, stride, mode):
    """Threads split the expanded channels: blocks shared unevenly (40 channels: 3 blocks on
    AVX2, 1 a thread that gets none on AVX-512), a partial last block (20), a residual."""
    _expand_dw_case(*shape, stride, mode, by_channels=True)
    _expand_dw_case(*shape, stride, mode, by_channels=True, res=True, seed=5, sums=False)


@pytest.mark.parametrize("vectors", [1, 2, 3])
def test_expand_dw_by_channels_any_register_tile(vectors):
    _expand_dw_case(2, 16, 104, 9, 10, 1, gc.TOPK, by_channels=True, vectors=vectors)
    _expand_dw_case(1, 16, 72, 9, 10, 2, native.DENSE, by_channels=True, vectors=vectors)


@pytest.mark.parametrize("mode", [native.DENSE, gc.TOPK])
@pytest.mark.parametrize("shape", [(1, 3, 32, 224, 224), (2, 3, 16, 20, 18), (1, 8, 24, 10, 9)])
def test_expand_dw_strided_3x3_first_layer(shape, mode):
    """A 3x3 stride-2 first layer (MobileNetV2's stem) computed a window of rows at a time."""
    assert native.expand_dw_fits(native.NhwcConv(torch.randn(4, 3, 3, 3), stride=2, padding=1),
                                 shape[3])
    _expand_dw_case(*shape, 1, mode, kernel=3, first_stride=2)
    _expand_dw_case(*shape, 2, mode, kernel=3, first_stride=2, res=True, seed=4)


def test_expand_dw_fits():
    """Rows a window at a time need top padding under one stride and none at the bottom."""
    assert native.expand_dw_fits(native.NhwcConv(torch.randn(4, 3, 3, 3), stride=2, padding=1), 224)
    assert not native.expand_dw_fits(native.NhwcConv(torch.randn(4, 3, 3, 3), stride=2, padding=1), 9)
    assert not native.expand_dw_fits(native.NhwcConv(torch.randn(4, 3, 3, 3), padding=1), 16)
    with pytest.raises(native.ConfigError, match="expand_dw_fits"):
        native.OpProgram().add_expand_dw(native.NhwcConv(torch.randn(8, 4, 3, 3), stride=2, padding=1),
                                         native.DepthwiseConv3x3(torch.randn(8, 1, 3, 3)), 0, 1,
                                         (1, 4, 16, 16), by_channels=True)


def test_expand_dw_large_map_many_windows():
    _expand_dw_case(1, 24, 144, 56, 56, 1, gc.TOPK)
    _expand_dw_case(2, 16, 96, 57, 45, 2, native.DENSE, sums=False)


def _use_variant(monkeypatch, flag: str) -> None:
    """Run this test on the native library built with ``flag`` (e.g. a small window macro)."""
    try:
        lib = native._build((flag,))
    except RuntimeError as exc:
        pytest.skip(f"cannot build the variant: {exc}")
    monkeypatch.setattr(native, "_lib", lib)


def test_expand_dw_small_windows(monkeypatch):
    """A window of a few rows: every group keeps rows of the one before (built with a small
    EXPAND_DW_WINDOW_BYTES)."""
    _use_variant(monkeypatch, "-DEXPAND_DW_WINDOW_BYTES=6000")
    for stride in (1, 2):
        _expand_dw_case(2, 8, 20, 17, 15, stride, gc.TOPK)
        _expand_dw_case(1, 8, 20, 16, 15, stride, native.DENSE)


def test_expand_dw_on_the_avx2_build(avx2_native):
    for stride in (1, 2):
        _expand_dw_case(2, 8, 40, 13, 11, stride, gc.TOPK)
        _expand_dw_case(1, 24, 144, 28, 28, stride, native.DENSE)


def test_expand_dw_refuses_other_layers():
    g = torch.Generator().manual_seed(0)
    dw = native.DepthwiseConv3x3(torch.randn(8, 1, 3, 3, generator=g))
    with pytest.raises(native.ConfigError, match="1x1"):
        native.OpProgram().add_expand_dw(native.NhwcConv(torch.randn(8, 4, 3, 3), padding=1), dw,
                                         0, 1, (1, 4, 5, 5))
    with pytest.raises(native.ConfigError, match="channels"):
        native.OpProgram().add_expand_dw(native.NhwcConv(torch.randn(6, 4, 1, 1)), dw, 0, 1,
                                         (1, 4, 5, 5))


def _conv_maxpool_case(n, c, cout, h, w, kernel, stride, pad, pool, seed=5,
                       clamp=native.RELU, pool_clamp=native.NO_CLAMP, chunk=0):
    """add_conv_maxpool against the convolution's and the max-pool's own calls (``pool``: kernel,
    stride, padding), and against F.conv2d + F.max_pool2d within float rounding."""
    g = torch.Generator().manual_seed(seed)
    x = _nhwc(torch.randn(n, c, h, w, generator=g))
    weight, bias = torch.randn(cout, c, kernel, kernel, generator=g), torch.randn(cout, generator=g)
    conv = native.NhwcConv(weight, bias, stride, pad)
    pk, ps, pp = pool
    want = native.maxpool_nhwc(conv(x, clamp=clamp), (pk, pk), (ps, ps), (pp, pp), pool_clamp)
    ref = F.max_pool2d(F.conv2d(x, weight, bias, stride, pad).clamp(*clamp), pk, ps, pp)
    assert rel_err(want, ref.clamp(*pool_clamp)) < 1e-5
    prog = native.OpProgram()
    prog.add_conv_maxpool(conv, 0, 1, (n, c, h, w), (pk, pk), (ps, ps), (pp, pp), clamp, pool_clamp)
    if chunk:
        prog.set_chunk(0, chunk)
    out = torch.empty_like(want)
    slots = native.OpProgram.slot_array(2)
    for i, t in enumerate((x, out)):
        slots[i] = t.data_ptr()
    for _ in range(2):
        out.fill_(float("nan"))
        prog.run(slots)
        assert torch.equal(out, want)


@pytest.mark.parametrize("case", [
    (1, 3, 64, 224, 224, 7, 2, 3, (3, 2, 1)),  # ResNet's stem
    (2, 3, 64, 37, 29, 7, 2, 3, (3, 2, 1)),   # odd sizes, a batch
    (3, 5, 24, 20, 23, 3, 1, 1, (2, 2, 0)),   # a VGG-like pool, channels not a whole vector
    (2, 4, 40, 17, 9, 5, 2, 2, (3, 1, 1)),    # overlapping windows, stride 1
    (1, 3, 16, 9, 9, 7, 2, 3, (3, 2, 1)),     # a map smaller than a window of rows
])
def test_conv_maxpool_equals_its_two_layers(case):
    _conv_maxpool_case(*case)


def test_conv_maxpool_clamps_and_chunks():
    _conv_maxpool_case(4, 3, 32, 30, 26, 7, 2, 3, (3, 2, 1), clamp=native.NO_CLAMP,
                       pool_clamp=native.RELU6, chunk=1)
    _conv_maxpool_case(3, 3, 32, 30, 26, 3, 2, 1, (3, 2, 1), chunk=2)


def test_conv_maxpool_small_windows(monkeypatch):
    """A window of a few rows: every group keeps rows of the one before (built with a small
    CONV_POOL_WINDOW_BYTES)."""
    _use_variant(monkeypatch, "-DCONV_POOL_WINDOW_BYTES=6000")
    _conv_maxpool_case(2, 3, 16, 41, 23, 7, 2, 3, (3, 2, 1))
    _conv_maxpool_case(1, 4, 24, 19, 15, 3, 1, 1, (3, 1, 1))


def test_conv_maxpool_refuses_pools_of_too_many_rows():
    conv = native.NhwcConv(torch.randn(4, 3, 3, 3))
    with pytest.raises(native.ConfigError, match="kernel rows"):
        native.OpProgram().add_conv_maxpool(conv, 0, 1, (1, 3, 80, 80), (65, 2), (1, 1), (0, 0))


def test_conv_maxpool_on_the_avx2_build(avx2_native):
    _conv_maxpool_case(1, 3, 64, 112, 96, 7, 2, 3, (3, 2, 1))
    _conv_maxpool_case(2, 5, 24, 20, 23, 3, 1, 1, (2, 2, 0))


def _linear_run(x: torch.Tensor, weight: torch.Tensor, bias, chunk: int = 0) -> torch.Tensor:
    prog = native.OpProgram()
    prog.add_linear(weight, bias, 0, 1, x.shape[0])
    prog.set_chunk(0, chunk)
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"))
    slots = native.OpProgram.slot_array(2)
    slots[0], slots[1] = x.data_ptr(), out.data_ptr()
    prog.run(slots)
    return out


@pytest.mark.parametrize("n,c,o,bias", [(1, 1280, 1000, True), (3, 37, 5, False), (2, 64, 64, True),
                                        (5, 512, 130, True)])
def test_linear_equals_f_linear_within_float_rounding(n, c, o, bias):
    """Sums in input order, then the bias: within float32 rounding of the float64 product (no
    bit-for-bit claim against F.linear, whose BLAS sums in another order)."""
    g = torch.Generator().manual_seed(n * 1000 + o)
    x, w = torch.randn(n, c, generator=g), torch.randn(o, c, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    got = _linear_run(x, w, b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # sequential float32 sums of c terms of magnitude ~1: error well under c * eps * sqrt(c)
    assert (got.double() - want).abs().max() <= 4 * c * 6e-8 * max(1.0, c ** 0.5)
    assert torch.equal(_linear_run(x, w, b, chunk=1), got)  # chunk by chunk: the same values


def test_linear_on_the_avx2_build_equals_the_default_build(avx2_native):
    """Each output's sum is in input order on both builds: the same values bit for bit."""
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(3, 300, generator=g), torch.randn(70, 300, generator=g), torch.randn(70, generator=g)
    got = _linear_run(x, w, b)
    native_default = native._build()  # the default build, called directly
    prog = native.OpProgram()
    prog.add_linear(w, b, 0, 1, 3)
    out = torch.empty(3, 70)
    slots = native.OpProgram.slot_array(2)
    slots[0], slots[1] = x.data_ptr(), out.data_ptr()
    lib = native_default
    lib.ispc_run_ops.restype = ctypes.c_int64
    arr = (native._Op * 1)(*prog._ops)
    ws = torch.zeros(64)
    assert lib.ispc_run_ops(arr, ctypes.c_int64(1), slots, ctypes.c_void_p(ws.data_ptr()),
                            ctypes.c_int64(64), ctypes.c_int64(2)) == 0
    assert torch.equal(out, got)


def test_linear_rejects_what_it_cannot_run():
    prog = native.OpProgram()
    with pytest.raises(IspcError):
        prog.add_linear(torch.randn(4, 3, dtype=torch.float64), None, 0, 1, 1)
    with pytest.raises(IspcError):
        prog.add_linear(torch.randn(4, 3), torch.randn(5), 0, 1, 1)



def _linear_t_run(x: torch.Tensor, weight: torch.Tensor, bias, clamp=native.NO_CLAMP,
                  chunk: int = 0, lib=None) -> torch.Tensor:
    """:meth:`OpProgram.add_linear_input_major` on ``x`` ((N, F) features or an (N, C, H, W) map,
    read channels-last) with ``weight`` (out, in) handed over input-major; ``lib``: a build to
    call directly."""
    xm = x if x.dim() == 4 else x[:, :, None, None]
    xm = xm.contiguous(memory_format=torch.channels_last)
    prog = native.OpProgram()
    prog.add_linear_input_major(weight.t().contiguous(), bias, 0, 1, tuple(xm.shape), clamp)
    prog.set_chunk(0, chunk)
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"))
    slots = native.OpProgram.slot_array(2)
    slots[0], slots[1] = xm.data_ptr(), out.data_ptr()
    if lib is None:
        prog.run(slots)
        return out
    lib.ispc_run_ops.restype = ctypes.c_int64
    arr = (native._Op * 1)(*prog._ops)
    need = lib.ispc_run_ops(arr, ctypes.c_int64(1), slots, None, ctypes.c_int64(0), ctypes.c_int64(2))
    ws = torch.zeros(max(need, 1))
    assert lib.ispc_run_ops(arr, ctypes.c_int64(1), slots, ctypes.c_void_p(ws.data_ptr()),
                            ctypes.c_int64(ws.numel()), ctypes.c_int64(2)) == 0
    return out


def _planted(shape, zero: float, shared: bool, g: torch.Generator) -> torch.Tensor:
    """Random features with a share ``zero`` of exact zeros: the same features in every instance
    (``shared``: whole weight rows skipped) or drawn per instance."""
    x = torch.randn(shape, generator=g)
    mask = torch.rand((1, *shape[1:]) if shared else shape, generator=g) < zero
    return x.masked_fill(mask.expand(shape), 0.0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 40), hw=st.sampled_from([(1, 1), (1, 3), (2, 2), (3, 5)]),
       o=st.integers(1, 150), zero=st.sampled_from([0.0, 0.4, 0.9, 1.0]), shared=st.booleans(),
       bias=st.booleans(), relu=st.booleans())
def test_linear_input_major_equals_f_linear_on_planted_zeros(n, c, hw, o, zero, shared, bias, relu):
    """Skipping the zero inputs (and their weight rows) gives F.linear of the flattened map
    (NCHW feature order from a channels-last map) within float32 rounding; chunk by chunk the
    same values."""
    g = torch.Generator().manual_seed(n * 7919 + c * 131 + o)
    x = _planted((n, c, *hw), zero, shared, g)
    w, b = torch.randn(o, c * hw[0] * hw[1], generator=g), torch.randn(o, generator=g) if bias else None
    clamp = native.RELU if relu else native.NO_CLAMP
    got = _linear_t_run(x, w, b, clamp)
    want = torch.nn.functional.linear(x.flatten(1).double(), w.double(), None if b is None else b.double())
    if relu:
        want = want.relu()
    f = c * hw[0] * hw[1]
    assert (got.double() - want).abs().max() <= 4 * f * 6e-8 * max(1.0, f ** 0.5) * (1 + want.abs().max())
    assert torch.equal(_linear_t_run(x, w, b, clamp, chunk=1), got)


def test_linear_input_major_at_classifier_sizes():
    """VGG-16's first layer's shape (512 x 7 x 7 -> 4096, 40% zeros) and a 4096 -> 1000 one."""
    g = torch.Generator().manual_seed(3)
    for shape, o in (((1, 512, 7, 7), 4096), ((2, 4096), 1000)):
        x = _planted(shape, 0.4, False, g).relu()
        w, b = torch.randn(o, x[0].numel(), generator=g) * 0.01, torch.randn(o, generator=g)
        want = torch.nn.functional.linear(x.flatten(1).double(), w.double(), b.double())
        torch.testing.assert_close(_linear_t_run(x, w, b).double(), want, rtol=0, atol=2e-4)


def test_linear_input_major_on_the_avx2_build_equals_the_default_build(avx2_native):
    """Each output sums its kept terms in input order on both builds (the column tails of 1000
    outputs are scalar on one, vectors on the other): the same values bit for bit."""
    g = torch.Generator().manual_seed(11)
    for shape, o in (((3, 24, 2, 3), 1000), ((1, 300), 70), ((5, 64), 37)):
        x = _planted(shape, 0.5, False, g)
        w, b = torch.randn(o, x[0].numel(), generator=g), torch.randn(o, generator=g)
        got = _linear_t_run(x, w, b, native.RELU)
        assert torch.equal(_linear_t_run(x, w, b, native.RELU, lib=native._build()), got)


def test_linear_input_major_rejects_what_it_cannot_run():
    prog = native.OpProgram()
    with pytest.raises(IspcError):  # not input-major
        prog.add_linear_input_major(torch.randn(6, 4).t(), None, 0, 1, (1, 6, 1, 1))
    with pytest.raises(IspcError):  # 2 x 2 x 2 features, 6 rows
        prog.add_linear_input_major(torch.randn(6, 4), None, 0, 1, (1, 2, 2, 2))
    with pytest.raises(IspcError):
        prog.add_linear_input_major(torch.randn(6, 4), torch.randn(6), 0, 1, (1, 6, 1, 1))


def test_entries_are_declared_on_every_library_object(monkeypatch):
    """A library object made after another was collected may get its id() (the tests' AVX2 and
    small-window builds did): its entries must still be declared (a float argument to an
    undeclared entry is a ctypes error). Simulated: every object gets the same id()."""
    import ctypes

    path = native._loaded()._name
    monkeypatch.setattr(native, "id", lambda obj: 1, raising=False)
    x = torch.randn(1, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        monkeypatch.setattr(native, "_lib", ctypes.CDLL(path))  # a fresh, undeclared object
        assert torch.equal(native.maxpool_nhwc(x, (3, 3), (2, 2), (1, 1)),
                           torch.nn.functional.max_pool2d(x, 3, 2, 1))
        assert native._run_ops_lib().ispc_run_ops.argtypes is not None
