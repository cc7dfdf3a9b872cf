"""The native indirect-GEMM kernel equals the masked-dense reference, in every orientation."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, threshold_between
from ispc.ops import gated_conv as gc
from ispc.ops import native
from ispc.ops.cpu_kernels import gated_conv2d_native, run_strategy

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")

ORIENTS = [native.ORIENT_PIX, native.ORIENT_CO, native.ORIENT_CL]

# (cin, cout, kernel, stride, padding, dilation, H, W): odd sizes so that neither the output
# channels nor the positions fill whole register blocks, and cin > 2 * 75 for a 3x3 layer so that
# the pixel orientation's reduction runs in several chunks
SHAPES = [
    (16, 8, 3, 1, 1, 1, 8, 8),
    (13, 29, 3, 2, 1, 1, 9, 11),
    (24, 16, 1, 1, 0, 1, 7, 7),
    (24, 33, 1, 2, 0, 1, 9, 9),
    (17, 5, 5, 2, 2, 1, 12, 10),
    (32, 12, 3, 1, 2, 2, 10, 10),
    (8, 8, (3, 1), (2, 1), (1, 0), 1, 6, 9),
    (20, 8, 1, 1, 1, 1, 5, 5),
    (170, 19, 3, 1, 1, 1, 6, 7),
    (9, 70, 3, 3, 0, 1, 13, 13),
    (48, 20, 1, 1, 0, 1, 5, 7),     # 1x1, stride 1, unpadded: read from the input directly
    (40, 24, 1, 1, 0, 1, 16, 16),   # ... with a whole last block (no tail)
    (48, 20, 1, 1, 0, 1, 5, 4),     # ... whole blocks of the channel-lane orientation (10 positions)
    (1100, 70, 1, 1, 0, 1, 3, 5),   # ... its reduction in chunks (over 512 kept channels)
    (30, 16, 1, (2, 3), 0, 1, 11, 13),  # 1x1 strided: only one stride phase is materialized
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _run(x, w, b, scale, stride, pad, dil, mode, thr, k, sal, orient):
    layer = native.NativeLayer(w, b, _pair(stride), _pair(pad), _pair(dil), orient)
    return gated_conv2d_native(x, w, layer, b, scale, _pair(stride), _pair(pad), _pair(dil), mode,
                               thr, k, sal)


def _ref(x, w, b, scale, stride, pad, dil, mode, thr, k, sal):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dil)
    return gc.gated_conv2d_reference(x, w, b, scale, sh, sw, ph, pw, dh, dw, mode, thr, k, sal)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("orient", ORIENTS)
def test_matches_reference(shape, n, orient):
    cin, cout, ks, stride, pad, dil, h, w = shape
    kh, kw = _pair(ks)
    g = torch.Generator().manual_seed(cin * 31 + cout)
    x = torch.randn(n, cin, h, w, generator=g)
    wt, b = torch.randn(cout, cin, kh, kw, generator=g), torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    for mode, thr, k in [(gc.TOPK, 0.0, max(1, cin // 2)), (gc.TOPK, 0.0, 1), (gc.TOPK, 0.0, 0),
                         (gc.THRESHOLD, 0.9, 0), (gc.THRESHOLD, 1.05, 0), (gc.THRESHOLD, 1e9, 0)]:
        for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            a = (x, wt, b, scale, stride, pad, dil, mode, thr, k, sal)
            ref = _ref(*a)
            out = _run(*a, orient)
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= 1e-5, (mode, thr, k, sal)


def test_threshold_batch_with_different_counts_per_instance():
    # instance 0 keeps nothing, 1 keeps everything, the others some: one call serves all; with 3
    # instances the channel-lane kernel splits its work by tile, with 8 by (block, instance) pair
    for n, cout in ((3, 24), (8, 70)):
        x = torch.randn(n, 120, 12, 12)
        x[0] *= 1e-3
        x[1] += 10.0
        w, b, scale = torch.randn(cout, 120, 3, 3), torch.randn(cout), torch.ones(120)
        a = (x, w, b, scale, 1, 1, 1, gc.THRESHOLD, 1.0, 0, gc.SALIENCY_L2)
        counts = (gc.channel_saliency(x, scale) >= 1.0).sum(1)
        assert counts[0] == 0 and counts[1] == 120 and 0 < counts[2] < 120
        for orient in ORIENTS:
            out = _run(*a, orient)
            assert torch.allclose(out[0], b.view(-1, 1, 1).expand(cout, 12, 12))
            assert rel_err(out, _ref(*a)) <= 1e-5


def test_topk_selection_in_the_kernel_with_ties_among_silent_channels():
    # half the channels are all zero (saliency ties at 0): k below, at and above the live count
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 7, 7, generator=g).relu()
    x[:, ::2] = 0.0
    w, b, s = torch.randn(9, 24, 3, 3, generator=g), torch.randn(9, generator=g), torch.rand(24, generator=g)
    for k in (1, 6, 12, 18, 23):
        for sal in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            a = (x, w, b, s, 1, 1, 1, gc.TOPK, 0.0, k, sal)
            for orient in ORIENTS:
                assert rel_err(_run(*a, orient), _ref(*a)) <= 1e-5, (k, sal, orient)


def _topk_rule(s: list[float], k: int) -> list[int]:
    """The selection's order: the k largest, NaN as +inf, -0 equal to +0, ties in channel order."""
    key = [float("inf") if v != v else v for v in s]
    return sorted(sorted(range(len(s)), key=lambda c: (-key[c], c))[:k])


@pytest.mark.parametrize("channels_last", [False, True])
def test_topk_selection_orders_nan_zeros_infinities_and_ties_as_documented(channels_last):
    # 1x1 maps and L1 saliency: each channel's saliency is |x| * scale, exactly; negative scales
    # give negative saliencies and -0, x = NaN / inf give NaN / inf, values from a small set tie
    g = torch.Generator().manual_seed(11)
    pool = torch.tensor([0.0, 1.0, 2.0, 0.5, float("inf"), float("nan")])
    for c in (1, 2, 5, 16, 33, 64, 257, 2048):
        x = pool[torch.randint(0, len(pool), (4, c, 1, 1), generator=g)]
        scale = pool[torch.randint(0, 4, (c,), generator=g)] * torch.where(
            torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sal = (x.abs()[:, :, 0, 0] * scale).tolist()
        for k in sorted({0, 1, c // 3, c // 2, c - 1, c}):
            idx, counts = native.select(x, scale, gc.TOPK, 0.0, k, gc.SALIENCY_L1)
            for n in range(4):
                got = idx[n, :counts[n]].tolist()
                assert got == _topk_rule(sal[n], k), (c, k, n)


def test_large_batch_runs_in_chunks_of_instances():
    # 128 of 256 channels, 3x3, 14x14: ~230k floats of packed panels per instance, so the channel-
    # lane kernel packs and computes these 12 instances in two chunks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 256, 14, 14, generator=g)
    w, b, s = torch.randn(40, 256, 3, 3, generator=g), torch.randn(40, generator=g), torch.ones(256)
    for mode, thr, k in [(gc.TOPK, 0.0, 128), (gc.THRESHOLD, 1.0, 0)]:
        a = (x, w, b, s, 1, 1, 1, mode, thr, k, gc.SALIENCY_L2)
        assert rel_err(_run(*a, native.ORIENT_CO), _ref(*a)) <= 1e-5


def test_channels_last_copies_run_in_chunks_of_instances():
    # the index entry (no selection chunks in front): 40 instances of 96 kept channels at 30x30
    # (32x32 padded) are ~98k floats of channels-last copy each, so ORIENT_CL copies and computes
    # them in two chunks; rows keep different counts, the first none
    g = torch.Generator().manual_seed(4)
    n, c = 40, 128
    x = torch.randn(n, c, 30, 30, generator=g)
    w, b = torch.randn(20, c, 3, 3, generator=g), torch.randn(20, generator=g)
    idx = torch.stack([torch.randperm(c, generator=g)[:96] for _ in range(n)])
    counts = torch.randint(1, 97, (n,), generator=g)
    counts[0] = 0
    layer = native.NativeLayer(w, b, (1, 1), (1, 1), (1, 1), native.ORIENT_CL)
    out = layer(x, idx.clone(), counts)
    mask = torch.zeros(n, c)
    for i in range(n):
        mask[i, idx[i, :counts[i]]] = 1.0
    ref = torch.nn.functional.conv2d(x * mask[:, :, None, None], w, b, 1, 1)
    assert rel_err(out, ref) <= 1e-5


def test_inputs_beyond_the_cache_budget_select_and_convolve_in_chunks_of_instances():
    # 4 MB per instance (256 channels of 64x64): saliency, selection and convolution run one
    # instance at a time, each with its own kept count and its own slice of the residual
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 256, 64, 64, generator=g).relu() * torch.rand(3, 256, 1, 1, generator=g)
    w, b, s = torch.randn(6, 256, 3, 3, generator=g), torch.randn(6, generator=g), torch.ones(256)
    thr = threshold_between(gc.channel_saliency(x, s, gc.SALIENCY_L2), 0.5)
    for orient in ORIENTS:
        layer = native.NativeLayer(w, b, (1, 1), (1, 1), (1, 1), orient)
        for mode, t, k in [(gc.TOPK, 0.0, 100), (gc.THRESHOLD, thr, 0)]:
            ref = _ref(x, w, b, s, 1, 1, 1, mode, t, k, gc.SALIENCY_L2)
            r = torch.randn(ref.shape, generator=g)
            out = layer.gated(x, s, mode, t, k, gc.SALIENCY_L2, r, native.RELU)
            assert rel_err(out, (ref + r).relu()) <= 1e-5, (orient, mode)


def test_all_kept_is_the_dense_conv_and_channels_last_input_is_accepted():
    x = torch.randn(2, 20, 9, 9)
    w, b, s = torch.randn(10, 20, 3, 3), torch.randn(10), torch.ones(20)
    dense = torch.nn.functional.conv2d(x, w, b, 1, 1)
    assert torch.equal(_run(x, w, b, s, 1, 1, 1, gc.TOPK, 0.0, 20, 0, native.ORIENT_PIX), dense)
    xc = x.contiguous(memory_format=torch.channels_last)
    ref = _ref(x, w, b, s, 1, 1, 1, gc.TOPK, 0.0, 7, 0)
    for orient in ORIENTS:
        assert rel_err(_run(xc, w, b, s, 1, 1, 1, gc.TOPK, 0.0, 7, 0, orient), ref) <= 1e-5


def test_results_do_not_depend_on_threads_or_workspace_history():
    big, small = torch.randn(1, 64, 30, 30), torch.randn(2, 8, 5, 5)
    wb, ws = torch.randn(32, 64, 3, 3), torch.randn(4, 8, 3, 3)
    bb, bs = torch.randn(32), torch.randn(4)
    args_big = (big, wb, bb, torch.ones(64), 1, 1, 1, gc.TOPK, 0.0, 20, 0, native.ORIENT_PIX)
    args_small = (small, ws, bs, torch.ones(8), 1, 1, 1, gc.TOPK, 0.0, 3, 0, native.ORIENT_CO)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = _run(*args_big)
        torch.set_num_threads(2)
        _run(*args_small)  # a smaller call in between reuses the same workspace
        second = _run(*args_big)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)
    assert rel_err(first, _ref(*args_big[:-1])) <= 1e-5


def test_run_strategy_falls_back_for_other_dtypes():
    x, w, b = (t.to(torch.bfloat16) for t in (torch.randn(2, 16, 8, 8), torch.randn(8, 16, 3, 3),
                                               torch.randn(8)))
    s = torch.ones(16)
    layer = native.NativeLayer(w.float(), b.float(), (1, 1), (1, 1), (1, 1), native.ORIENT_PIX)
    ref = _ref(x, w, b, s, 1, 1, 1, gc.TOPK, 0.0, 8, 0)
    out = run_strategy("native", x, w, layer, b, s, (1, 1), (1, 1), (1, 1), gc.TOPK, 0.0, 8, 0)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref.float()) <= 3e-2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 40), cout=st.integers(1, 30), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2),
       pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2), h=st.integers(4, 17),
       w=st.integers(4, 17), keep=st.floats(0.0, 1.0), topk=st.booleans(),
       orient=st.sampled_from(ORIENTS), seed=st.integers(0, 2**16))
def test_random_geometry_matches_reference(n, cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, h, w, keep,
                                           topk, orient, seed):
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # no output position
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    wt, b = torch.randn(cout, cin, kh, kw, generator=g), torch.randn(cout, generator=g)
    s = torch.ones(cin)
    if topk:
        mode, thr, k = gc.TOPK, 0.0, int(round(keep * cin))
    else:
        mode, thr, k = gc.THRESHOLD, threshold_between(gc.channel_saliency(x, s), keep), 0
    a = (x, wt, b, s, (sh, sw), (ph, pw), (dh, dw), mode, thr, k, gc.SALIENCY_L2)
    assert rel_err(_run(*a, orient), _ref(*a)) <= 1e-5


def test_disabled_by_environment_falls_back_to_pytorch_kernels(tmp_path):
    code = ("import torch, ispc\n"
            "from ispc.ops import native\n"
            "assert not native.available() and 'ISPC_NATIVE=0' in native.unavailable_reason()\n"
            "from ispc.examples.models import resnet20\n"
            "c = ispc.compile(resnet20().eval(), [torch.randn(4, 3, 32, 32)], progress=False)\n"
            "assert {m.strategy for m in c.gated_modules().values()} <= {'gather', 'gemm'}\n")
    env = {**os.environ, "ISPC_NATIVE": "0", "ISPC_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_cache_sizes_are_this_cpus():
    """The kernels block for the L2 the system reports (1 MiB on AMD Zen 4, 2 MiB on Intel
    Sapphire Rapids), not for a fixed one."""
    sizes = native.cache_bytes()
    got = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True)
    l2 = int(got.stdout.strip() or 0) if got.returncode == 0 else 0  # glibc's sysconf, as in C
    if "NH_L2_BYTES" in os.environ.get("ISPC_NATIVE_FLAGS", ""):
        pytest.skip("ISPC_NATIVE_FLAGS fixes the L2 size")
    assert sizes["l2"] == (l2 if (128 << 10) <= l2 <= (64 << 20) else 2 << 20)
    assert (16 << 10) <= sizes["l1d"] <= (1 << 20)


def test_strides_beyond_the_phase_limit_are_refused():
    assert native.supports((8, 8)) and not native.supports((9, 8))
    with pytest.raises(ValueError, match="phases"):
        native.NativeLayer(torch.randn(4, 4, 1, 1), None, (9, 8), (0, 0), (1, 1), native.ORIENT_PIX)


def test_layer_survives_copy_and_pickle():
    import copy
    import pickle

    w, b = torch.randn(12, 20, 3, 3), torch.randn(12)
    x = torch.randn(2, 20, 9, 9)
    layer = native.NativeLayer(w, b, (1, 1), (1, 1), (1, 1), native.ORIENT_CO)
    idx = torch.arange(0, 20, 2).repeat(2, 1).contiguous()
    expect = layer(x, idx, None)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        del layer  # the copies must not point into the original's tensors
        assert torch.equal(other(x, idx, None), expect)
        layer = other


@pytest.mark.parametrize("clamp", [native.NO_CLAMP, native.RELU, native.RELU6])
def test_maxpool2x2_equals_max_pool_then_clamp(clamp):
    g = torch.Generator().manual_seed(6)
    for shape in [(1, 64, 56, 56), (2, 3, 9, 37), (1, 5, 4, 2), (3, 2, 7, 70), (1, 1, 3, 3)]:
        x = torch.randn(*shape, generator=g) * 8
        x[0, 0, 1, 1] = float("nan")
        out = native.maxpool2x2(x, clamp)
        if out is None:
            pytest.skip("this build has no 2x2 pool kernel (AVX-512 only)")
        expected = F.max_pool2d(x, 2).clamp(*clamp)
        assert torch.equal(out.isnan(), expected.isnan()), shape
        assert torch.equal(out.nan_to_num(), expected.nan_to_num()), shape


def test_avx2_code_path_matches_reference(avx2_native):
    lib = avx2_native
    assert lib.ispc_block_lanes(native.ORIENT_PIX) == 16
    for shape in SHAPES[:3] + SHAPES[-4:]:
        cin, cout, ks, stride, pad, dil, h, w = shape
        kh, kw = _pair(ks)
        x, wt, b = torch.randn(2, cin, h, w), torch.randn(cout, cin, kh, kw), torch.randn(cout)
        for orient in ORIENTS:
            for mode, thr, k, sal in [(gc.TOPK, 0.0, max(1, cin // 2), gc.SALIENCY_L2),
                                      (gc.THRESHOLD, 0.9, 0, gc.SALIENCY_L2),
                                      (gc.THRESHOLD, 0.7, 0, gc.SALIENCY_L1)]:  # selection in C too
                a = (x, wt, b, torch.ones(cin), stride, pad, dil, mode, thr, k, sal)
                assert rel_err(_run(*a, orient), _ref(*a)) <= 1e-5, (shape, orient, mode, sal)
    _check_epilogues(SHAPES[:3] + SHAPES[-4:])  # the epilogue's AVX2 stores and loads
    assert native.maxpool2x2(torch.randn(1, 2, 4, 4)) is None  # AVX-512 only: PyTorch's path


def test_streaming_stores_match_reference(monkeypatch):
    # outputs beyond STREAM_BYTES bypass the caches (whole aligned vectors: 1x1 layers whose
    # positions fill blocks); built with a 1-byte limit, every call here streams what it can
    lib = native._build(("-DSTREAM_BYTES=1",))
    monkeypatch.setattr(native, "_lib", lib)
    for shape in SHAPES + [(64, 40, 1, 1, 0, 1, 32, 32)]:
        cin, cout, ks, stride, pad, dil, h, w = shape
        kh, kw = _pair(ks)
        x, wt, b = torch.randn(3, cin, h, w).relu(), torch.randn(cout, cin, kh, kw), torch.randn(cout)
        for orient in ORIENTS:
            a = (x, wt, b, torch.ones(cin), stride, pad, dil, gc.TOPK, 0.0, max(1, cin // 2),
                 gc.SALIENCY_L2)
            assert rel_err(_run(*a, orient), _ref(*a)) <= 1e-5, (shape, orient)


def _check_epilogues(shapes) -> None:
    """NativeLayer.gated's fused epilogue equals act(reference + residual), NaN included."""
    for shape in shapes:
        cin, cout, ks, stride, pad, dil, h, w = shape
        kh, kw = _pair(ks)
        x, wt, b = torch.randn(3, cin, h, w), torch.randn(cout, cin, kh, kw), torch.randn(cout)
        s = torch.ones(cin)
        for orient in ORIENTS:
            layer = native.NativeLayer(wt, b, _pair(stride), _pair(pad), _pair(dil), orient)
            for k, res, clamp in [(max(1, cin // 2), True, native.RELU), (0, True, native.RELU6),
                                  (1, False, native.RELU6), (max(1, cin // 3), True, native.NO_CLAMP),
                                  (max(1, cin // 2), False, native.RELU)]:
                ref = _ref(x, wt, b, s, stride, pad, dil, gc.TOPK, 0.0, k, gc.SALIENCY_L2)
                r = torch.randn_like(ref) * 3 if res else None
                if r is not None:
                    r.view(-1)[::7] = float("nan")  # NaN passes through the add and the clamp
                    ref = ref + r
                ref = ref.clamp(*clamp)
                out = layer.gated(x, s, gc.TOPK, 0.0, k, gc.SALIENCY_L2, r, clamp)
                assert torch.equal(out.isnan(), ref.isnan()), (shape, orient, k, clamp)
                ok = ~ref.isnan()
                assert rel_err(out[ok], ref[ok]) <= 1e-5, (shape, orient, k, res, clamp)


def test_fused_epilogue_matches_reference():
    _check_epilogues(SHAPES)


def test_fused_epilogue_is_the_unfused_kernel_plus_pytorch_ops():
    """Bit for bit: the epilogue adds and clamps in the order the unfused graph does."""
    x, wt, b = torch.randn(2, 32, 14, 14), torch.randn(24, 32, 3, 3), torch.randn(24)
    s = torch.ones(32)
    for orient in ORIENTS:
        layer = native.NativeLayer(wt, b, (1, 1), (1, 1), (1, 1), orient)
        plain = layer.gated(x, s, gc.TOPK, 0.0, 16, gc.SALIENCY_L2)
        r = torch.randn_like(plain)
        assert torch.equal(layer.gated(x, s, gc.TOPK, 0.0, 16, gc.SALIENCY_L2, r, native.RELU),
                           torch.relu(plain + r))
        for bad in (r[:1], r.double(), r.transpose(2, 3)):  # shape, dtype, layout
            with pytest.raises(ValueError, match="contiguous float32 tensor of the output's shape"):
                layer.gated(x, s, gc.TOPK, 0.0, 16, gc.SALIENCY_L2, bad, native.RELU)


@pytest.mark.parametrize("n", [1, 15, 16, 1000, (1 << 16) + 7])  # tails, one thread, threaded
@pytest.mark.parametrize("clamp", [native.NO_CLAMP, native.RELU, native.RELU6])
@pytest.mark.parametrize("with_residual", [True, False])
def test_standalone_epilogue_is_the_pytorch_ops_bit_for_bit(n, clamp, with_residual):
    """``native.epilogue`` (the pass after a kernel that returned its output without the
    epilogue) adds, then clamps, in
    place, as PyTorch does: NaN passes through, the residual is only read."""
    out = torch.randn(n) * 8
    out[::97] = float("nan")
    res = torch.randn(n) * 8 if with_residual else None
    res0 = None if res is None else res.clone()
    want = out + res if with_residual else out.clone()
    want = torch.clamp(want, *clamp) if clamp != native.NO_CLAMP else want
    got = native.epilogue(out, res, clamp)
    assert got is out and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert res is None or torch.equal(res, res0)


def test_standalone_epilogue_refuses_what_it_cannot_read():
    out = torch.randn(4, 8)
    for bad in (torch.randn(4, 7), torch.randn(8, 4).t(), torch.randn(4, 8).double()):
        with pytest.raises(ValueError, match="residual"):
            native.epilogue(out, bad, native.RELU)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        native.epilogue(out.t(), None, native.RELU)


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ISPC_CACHE_DIR", str(tmp_path))
    first = native._build()
    files = list((tmp_path / "native").glob("ispc_native_*.so"))
    assert len(files) == 1
    native._build()
    assert list((tmp_path / "native").glob("ispc_native_*.so")) == files
    assert first.ispc_block_rows(native.ORIENT_CO) * first.ispc_block_lanes(native.ORIENT_PIX) > 0


# (N, C, kh, kw, Cout): the one-position orientation (a linear layer seen as a convolution whose
# kernel covers its input): output-channel counts on both sides of whole tiles, 1x1 and wider kernels
FULL_SHAPES = [(1, 64, 7, 7, 300), (3, 37, 3, 3, 257), (5, 64, 1, 1, 1000), (32, 40, 2, 2, 17),
               (2, 16, 5, 3, 512), (4, 700, 1, 1, 33)]


def _full_ref(x, w, b, s, mode, thr, k, sal=gc.SALIENCY_L2):
    return gc.gated_conv2d_reference(x, w, b, s, 1, 1, 0, 0, 1, 1, mode, thr, k, sal)


@pytest.mark.parametrize("shape", FULL_SHAPES)
def test_full_window_orientation_matches_reference(shape):
    n, c, kh, kw, cout = shape
    g = torch.Generator().manual_seed(n * 7 + c)
    x = torch.randn(n, c, kh, kw, generator=g).relu()
    w, b = torch.randn(cout, c, kh, kw, generator=g), torch.randn(cout, generator=g)
    s = torch.rand(c, generator=g) + 0.5
    layer = native.NativeLayer(w, b, (1, 1), (0, 0), (1, 1), native.ORIENT_FULL)
    sal = gc.channel_saliency(x, s)
    for mode, thr, k in [(gc.TOPK, 0.0, max(1, c // 2)), (gc.TOPK, 0.0, 1), (gc.TOPK, 0.0, 0),
                         (gc.TOPK, 0.0, c), (gc.THRESHOLD, threshold_between(sal, 0.4), 0),
                         (gc.THRESHOLD, 1e9, 0)]:
        for saliency in (gc.SALIENCY_L2, gc.SALIENCY_L1):
            ref = _full_ref(x, w, b, s, mode, thr, k, saliency)
            out = layer.gated(x, s, mode, thr, k, saliency)
            assert out.shape == ref.shape == (n, cout, 1, 1)
            assert rel_err(out, ref) <= 1e-5, (mode, thr, k, saliency)
            r = torch.randn(ref.shape, generator=g)
            fused = layer.gated(x, s, mode, thr, k, saliency, r, native.RELU)
            assert rel_err(fused, (ref + r).relu()) <= 1e-5


def test_full_window_batch_with_different_channels_per_instance():
    # instance 0 keeps nothing, 1 everything, the rest some: channel blocks pass over every row
    x = torch.randn(6, 300, 1, 1).relu()
    x[0] *= 1e-4
    x[1] += 10.0
    w, b, s = torch.randn(70, 300, 1, 1), torch.randn(70), torch.ones(300)
    layer = native.NativeLayer(w, b, (1, 1), (0, 0), (1, 1), native.ORIENT_FULL)
    out = layer.gated(x, s, gc.THRESHOLD, 0.5, 0, gc.SALIENCY_L2)
    counts = (gc.channel_saliency(x, s) >= 0.5).sum(1)
    assert counts[0] == 0 and counts[1] == 300 and 0 < counts[2] < 300
    assert torch.equal(out[0].flatten(), b)
    assert rel_err(out, _full_ref(x, w, b, s, gc.THRESHOLD, 0.5, 0)) <= 1e-5


def test_full_window_refuses_other_geometry():
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="ORIENT_FULL"):
        native.NativeLayer(w, None, (1, 1), (1, 1), (1, 1), native.ORIENT_FULL)
    layer = native.NativeLayer(w, None, (1, 1), (0, 0), (1, 1), native.ORIENT_FULL)
    with pytest.raises(ValueError, match="prepared for 3x3 inputs"):
        layer.gated(torch.randn(1, 4, 5, 5), torch.ones(4), gc.TOPK, 0.0, 2, gc.SALIENCY_L2)
    assert native.full_window((3, 3), (0, 0), (1, 1), (3, 3))
    assert not native.full_window((3, 3), (0, 0), (1, 1), (5, 5))
    assert not native.full_window((3, 3), (1, 1), (1, 1), (3, 3))


def test_full_window_avx2_variant(avx2_native):
    lib = avx2_native
    assert lib.ispc_block_lanes(native.ORIENT_FULL) == 64
    test_full_window_orientation_matches_reference(FULL_SHAPES[1])
    test_full_window_orientation_matches_reference(FULL_SHAPES[4])
