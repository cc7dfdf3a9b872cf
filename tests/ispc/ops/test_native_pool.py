"""ispc.ops.native.maxpool_nhwc: max-pooling of channels-last maps, exactly max_pool2d's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ispc.errors import ConfigError, DataError
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 2, 1), (3, 1, 1), (2, 2, 0), (3, 2, 0), ((3, 2), (2, 1), (1, 0)), (5, 3, 2), (1, 1, 0)])
@pytest.mark.parametrize("shape", [(1, 64, 112, 112), (3, 19, 13, 11), (2, 16, 8, 9), (1, 3, 5, 5)])
@pytest.mark.parametrize("clamp", [native.NO_CLAMP, native.RELU, native.RELU6])
def test_maxpool_nhwc_equals_max_pool_then_clamp(kernel, stride, padding, shape, clamp):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 8
    x[0, 0, 1, 1] = float("nan")  # NaN propagates through the max and the clamp alike
    x[-1, -1, 0, 0] = float("-inf")
    want = F.max_pool2d(x, kernel, stride, padding)
    want = want.clamp(*[None if abs(v) == float("inf") else v for v in clamp]) \
        if clamp != native.NO_CLAMP else want
    out = native.maxpool_nhwc(_cl(x), kernel, stride, padding, clamp)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


def test_maxpool_nhwc_refuses_what_it_does_not_compute():
    x = _cl(torch.randn(1, 4, 6, 6))
    with pytest.raises(DataError, match="channels-last"):
        native.maxpool_nhwc(torch.randn(1, 4, 6, 6), 3, 2, 1)
    with pytest.raises(ConfigError, match="padding at most half"):
        native.maxpool_nhwc(x, 3, 2, 2)
    with pytest.raises(DataError, match="smaller than"):
        native.maxpool_nhwc(x, 7, 1, 0)


@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 19, 5, 4), (2, 1280, 7, 7), (1, 64, 1, 1),
                                   (2, 200, 30, 30)])
def test_avgpool_global_nhwc_equals_adaptive_avg_pool(shape):
    x = _cl(torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))))
    want = F.adaptive_avg_pool2d(x, 1)
    out = native.avgpool_global_nhwc(x)
    assert out.shape == want.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-6
    with pytest.raises(DataError, match="channels-last"):
        native.avgpool_global_nhwc(torch.randn(1, 4, 3, 3))


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 3, 17, 5), (3, 1, 4, 4), (2, 16, 9, 7),
                                   (1, 5, 1, 3)])
def test_to_channels_last_equals_contiguous(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    want = x.contiguous(memory_format=torch.channels_last)
    out = native.to_channels_last(x)
    assert torch.equal(out, want) and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(DataError, match="at most"):
        native.to_channels_last(torch.randn(1, 17, 2, 2))
    with pytest.raises(DataError, match="contiguous float32"):
        native.to_channels_last(want.double())
