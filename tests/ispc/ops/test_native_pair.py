"""OpProgram.add_conv_pair: two convolutions summed (a ResNet block's last 1x1 and its downsample),
against the two add_conv calls it replaces (the same values) and the masked-dense reference."""
from __future__ import annotations

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


def _pair_case(n, ca, cb, cout, h, w, stride=1, mode=gc.TOPK, mode2=gc.TOPK, sums=True,
               clamp=native.RELU, threshold=0.0, seed=7, vectors=None, kernel2=1, fused=None):
    """Layer A (ca -> cout, 1x1) on an h x w map, layer B (cb -> cout, ``kernel2``, ``stride``) on
    its (h * stride) x (w * stride) one: the pair's output and output sums against the two calls
    through a map of A's, and against conv(x * m) of each within float rounding. ``fused``: whether
    A's map must stay unwritten (None: a batch of one and 1x1 layers fuse)."""
    g = torch.Generator().manual_seed(seed)
    hb, wb = h * stride, w * stride
    # channels of different scales, so that the selection matters
    xa = _nhwc(torch.randn(n, ca, h, w, generator=g) * (torch.rand(1, ca, 1, 1, generator=g) + 0.1))
    xb = _nhwc(torch.randn(n, cb, hb, wb, generator=g) * (torch.rand(1, cb, 1, 1, generator=g) + 0.1))
    wa, ba = torch.randn(cout, ca, 1, 1, generator=g), torch.randn(cout, generator=g)
    wbt, bb = torch.randn(cout, cb, kernel2, kernel2, generator=g), torch.randn(cout, generator=g)
    extra = {} if vectors is None else {"vectors": vectors}
    la = native.NhwcConv(wa, ba, out_hw=h * w, **extra)
    lb = native.NhwcConv(wbt, bb, stride, (kernel2 - 1) // 2, out_hw=h * w, **extra)
    sa, sb = torch.rand(ca, generator=g) + 0.5, torch.rand(cb, generator=g) + 0.5
    ka, kb = max(1, ca // 2), max(1, cb // 2)
    xsa, xsb = xa.square().sum((2, 3)).contiguous(), xb.square().sum((2, 3)).contiguous()
    gated_a, gated_b = mode != native.DENSE, mode2 != native.DENSE
    mid = la(xa, mode, scale=sa if gated_a else None, k=ka, threshold=threshold,
             x_sums=xsa if gated_a else None)
    want_sums = torch.empty(n, cout)
    want = lb(xb, mode2, scale=sb if gated_b else None, k=kb, threshold=threshold, residual=mid,
              clamp=clamp, x_sums=xsb if gated_b else None, out_sums=want_sums if sums else None,
              out_sums_kind=gc.SALIENCY_L2)
    # the contract: each layer conv(x * m) of its own input's mask
    ma = gc.channel_mask(xa, sa, mode if gated_a else gc.TOPK, threshold, ka if gated_a else ca)
    mb = gc.channel_mask(xb, sb, mode2 if gated_b else gc.TOPK, threshold, kb if gated_b else cb)
    ref = (F.conv2d(xa * ma[:, :, None, None], wa, ba)
           + F.conv2d(xb * mb[:, :, None, None], wbt, bb, stride, (kernel2 - 1) // 2)).clamp(*clamp)
    assert rel_err(want, ref) < 1e-5
    prog = native.OpProgram()
    prog.add_conv_pair(la, lb, 0, 1, 2, 3, tuple(xa.shape), tuple(xb.shape), mode,
                       sa if gated_a else None, threshold, ka, gc.SALIENCY_L2,
                       4 if gated_a else -1, mode2, sb if gated_b else None, threshold, kb,
                       gc.SALIENCY_L2, 5 if gated_b else -1, clamp=clamp,
                       sums_out=6 if sums else -1, sums_kind=gc.SALIENCY_L2)
    out, mid_slot, got_sums = torch.empty_like(want), torch.empty_like(mid), torch.empty(n, cout)
    slots = native.OpProgram.slot_array(7)
    for i, t in enumerate((xa, xb, mid_slot, out, xsa, xsb, got_sums)):
        slots[i] = t.data_ptr()
    fused = n == 1 and kernel2 == 1 if fused is None else fused
    for _ in range(2):
        out.fill_(float("nan"))
        mid_slot.fill_(float("nan"))
        prog.run(slots)
        assert torch.equal(out, want)
        if sums:
            assert torch.equal(got_sums, want_sums)
        assert bool(mid_slot.isnan().all()) == fused


@pytest.mark.parametrize("case", [
    (1, 64, 64, 256, 14, 14, 1),   # layer1.0's shapes on a smaller map
    (1, 32, 64, 128, 7, 9, 2),     # layer2.0's: the downsample of stride 2
    (1, 24, 40, 40, 5, 6, 1),      # outputs not a whole block, a partial last tile
    (1, 16, 8, 48, 1, 1, 2, gc.TOPK, gc.TOPK, True, native.RELU, 0.0, 7, None, 1, False),  # one
    # position: a single tile, not fused (NH_COMPACT_TILES)
    (1, 13, 7, 20, 6, 5, 1),       # odd channels
])
def test_pair_equals_its_two_layers(case):
    _pair_case(*case)


@pytest.mark.parametrize("modes", [(native.DENSE, native.DENSE), (native.DENSE, gc.TOPK),
                                   (gc.TOPK, native.DENSE), (gc.THRESHOLD, gc.THRESHOLD)])
def test_pair_modes(modes):
    _pair_case(1, 32, 48, 64, 9, 8, 1, *modes, threshold=0.6)


def test_pair_keeps_nothing_and_clamps():
    """A threshold no channel passes: each layer's bias alone; no clamp, no output sums."""
    _pair_case(1, 16, 24, 64, 6, 7, 1, gc.THRESHOLD, gc.THRESHOLD, threshold=1e9)
    _pair_case(1, 16, 24, 64, 6, 7, 2, clamp=native.NO_CLAMP, sums=False)


@pytest.mark.parametrize("vectors", [1, 2, 3])
def test_pair_any_register_tile(vectors):
    if vectors > native._loaded().ispc_nhwc_max_vectors():
        pytest.skip("no such tile on this build")
    _pair_case(1, 24, 32, 80, 8, 7, 2, vectors=vectors)


def test_pair_runs_apart_where_it_does_not_fuse():
    """Batches of several instances, a 3x3 second layer: the two convolutions in turn."""
    _pair_case(3, 16, 24, 64, 7, 6, 1)
    _pair_case(2, 16, 24, 64, 7, 6, 2, mode=native.DENSE)
    _pair_case(1, 16, 24, 64, 7, 6, 1, kernel2=3)


def test_pair_without_the_budget(monkeypatch):
    """Built with PAIR_BYTES=0: never fused, the same values."""
    try:
        lib = native._build(("-DPAIR_BYTES=0",))
    except RuntimeError as exc:
        pytest.skip(f"cannot build the variant: {exc}")
    monkeypatch.setattr(native, "_lib", lib)
    _pair_case(1, 32, 64, 128, 7, 9, 2, fused=False)


def test_pair_on_the_avx2_build(avx2_native):
    _pair_case(1, 64, 64, 256, 14, 14, 1)
    _pair_case(1, 24, 40, 40, 5, 6, 2)
    _pair_case(2, 16, 24, 64, 7, 6, 1)


def test_pair_refuses_layers_that_do_not_sum():
    a = native.NhwcConv(torch.randn(16, 8, 1, 1))
    b = native.NhwcConv(torch.randn(24, 8, 1, 1))
    with pytest.raises(native.ConfigError, match="equal outputs"):
        native.OpProgram().add_conv_pair(a, b, 0, 1, 2, 3, (1, 8, 4, 4), (1, 8, 4, 4), native.DENSE,
                                         None, 0.0, 0, 0, -1, native.DENSE, None, 0.0, 0, 0, -1)
    c = native.NhwcConv(torch.randn(16, 8, 1, 1))
    with pytest.raises(native.ConfigError, match="same shape"):
        native.OpProgram().add_conv_pair(a, c, 0, 1, 2, 3, (1, 8, 4, 4), (1, 8, 5, 4), native.DENSE,
                                         None, 0.0, 0, 0, -1, native.DENSE, None, 0.0, 0, 0, -1)
