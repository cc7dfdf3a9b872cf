"""The channels-last kernel's GELU epilogue (``clamp=native.GELU``): the exact (erf) GELU of the
masked-dense result, as ``F.gelu`` computes it, on every tile, mode, residual and ISA."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err
from ispc.ops import gated_conv as gc
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _reference(x, w, b, mode, scale, k, res=None):
    if mode != native.DENSE:
        m = gc.channel_mask(x, scale, mode, 0.0, k, gc.SALIENCY_L2)
        x = torch.where(m[:, :, None, None], x, torch.zeros(()))
    out = F.conv2d(x, w, b)
    return F.gelu(out if res is None else out + res)


def _check_layers(seed: int, vectors_top: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for vectors in range(1, vectors_top + 1):
        # 1x1 layers as the gated linear layers run them (P x 1 maps), odd channel counts: partial
        # vectors and tiles; values up to |8|: both tails of the erf
        for n, cin, cout, p in [(2, 24, 40, 37), (1, 17, 13, 5), (3, 48, 96, 50), (1, 8, 33, 1)]:
            x = torch.randn(n, cin, p, 1, generator=g) * 3
            w = torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5
            b, scale = torch.randn(cout, generator=g), torch.rand(cin, generator=g) + 0.5
            layer = native.NhwcConv(w, b, vectors=vectors)
            r = _nhwc(torch.randn(n, cout, p, 1, generator=g))
            for mode, k, res in [(native.DENSE, 0, None), (gc.TOPK, cin // 2, None),
                                 (gc.TOPK, cin // 3, r)]:
                want = _reference(x, w, b, mode, scale, k, res)
                out = layer(_nhwc(x), mode, scale=scale, k=k, residual=res, clamp=native.GELU)
                assert out.is_contiguous(memory_format=torch.channels_last)
                assert rel_err(out, want) <= 1e-5, (vectors, cin, cout, mode)


def test_gelu_epilogue_matches_reference_on_every_tile():
    _check_layers(0, int(native._lib.ispc_nhwc_max_vectors()))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 40), cout=st.integers(1, 70), ks=st.integers(1, 3),
       h=st.integers(3, 12), mode=st.sampled_from([native.DENSE, gc.TOPK]), keep=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_gelu_epilogue_on_random_layers(n, cin, cout, ks, h, mode, keep, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, h, generator=g) * 2
    w, b = torch.randn(cout, cin, ks, ks, generator=g), torch.randn(cout, generator=g)
    scale, k = torch.rand(cin, generator=g) + 0.5, int(round(keep * cin))
    layer = native.NhwcConv(w, b, 1, ks // 2)
    want = F.gelu(F.conv2d(torch.where(gc.channel_mask(x, scale, mode, 0.0, k, gc.SALIENCY_L2)
                                       [:, :, None, None], x, torch.zeros(())), w, b, 1, ks // 2)
                  ) if mode != native.DENSE else F.gelu(F.conv2d(x, w, b, 1, ks // 2))
    out = layer(_nhwc(x), mode, scale=scale, k=k, clamp=native.GELU)
    assert rel_err(out, want) <= 1e-5


def test_gelu_values_and_saliency_sums():
    # the activation alone (zero input, values as the bias): both tails, zero, NaN passes through;
    # elementwise within 3e-7 * max(1, |v|) of F.gelu (both are erf approximations within 1.5e-7)
    v = torch.cat([torch.linspace(-10, 10, 157), torch.tensor([0.0, -0.0, 1e-30, 1e20, -1e20, 88.0])])
    layer = native.NhwcConv(torch.zeros(v.numel(), 4, 1, 1), v)
    out = layer(_nhwc(torch.zeros(1, 4, 1, 1)), clamp=native.GELU).flatten()
    assert bool(((out - F.gelu(v)).abs() <= 3e-7 * v.abs().clamp_min(1)).all())
    nan = native.NhwcConv(torch.zeros(3, 4, 1, 1), torch.tensor([float("nan"), 1.0, -1.0]))
    y = nan(_nhwc(torch.zeros(1, 4, 1, 1)), clamp=native.GELU).flatten()
    assert y[0].isnan() and torch.allclose(y[1:], F.gelu(torch.tensor([1.0, -1.0])))
    # output saliency sums are of the stored (activated) values
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 16, 9, 1, generator=g), torch.randn(40, 16, 1, 1, generator=g)
    sums = torch.empty(2, 40)
    y = native.NhwcConv(w, torch.randn(40, generator=g))(_nhwc(x), gc.TOPK, scale=torch.ones(16),
                                                         k=8, clamp=native.GELU, out_sums=sums)
    assert rel_err(sums, (y * y).double().sum((2, 3)).float()) <= 1e-5


def test_avx2_build_gelu_matches_reference(avx2_native):
    _check_layers(1, int(avx2_native.ispc_nhwc_max_vectors()))
