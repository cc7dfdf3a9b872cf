"""native.OpProgram runs channels-last layers in one C call with the results of their own calls."""
from __future__ import annotations

import pytest
import torch

from ispc.ops import gated_conv as gc
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel not built here: {native.unavailable_reason()}")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def test_a_chain_equals_its_layers_called_one_by_one():
    g = torch.Generator().manual_seed(0)
    n, h, w = 2, 18, 14
    x = torch.randn(n, 3, h, w, generator=g)
    stem = native.NhwcConv(torch.randn(24, 3, 3, 3, generator=g), torch.randn(24, generator=g), 2, 1)
    dw = native.DepthwiseConv3x3(torch.randn(24, 1, 3, 3, generator=g), torch.randn(24, generator=g))
    pw = native.NhwcConv(torch.randn(24, 24, 1, 1, generator=g), torch.randn(24, generator=g))
    scale = torch.rand(24, generator=g) + 0.5

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


def test_to_channels_last_refuses_many_channels():
    with pytest.raises(native.ConfigError, match="at most"):
        native.OpProgram().add_to_channels_last(0, 1, (1, 64, 4, 4))
