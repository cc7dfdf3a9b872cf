"""ispc.modules.GatedConv2d: a layer that keeps every channel is the dense convolution everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ispc.modules import GatedConv2d


def _layer(mode: str, threshold: float, k: int) -> GatedConv2d:
    g = torch.Generator().manual_seed(0)
    return GatedConv2d(torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g), stride=(1, 1),
                       padding=(1, 1), dilation=(1, 1), mode=mode, threshold=threshold, k=k)


def _ops(layer: GatedConv2d, x: torch.Tensor) -> set[str]:
    ep = torch.export.export(layer, (x,))
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("mode, threshold, k", [("topk", 0.0, 8), ("topk", 0.0, 99), ("threshold", 0.0, 0)])
def test_keep_all_layer_is_the_dense_conv_in_eager_autograd_and_export(mode, threshold, k):
    layer = _layer(mode, threshold, k)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    dense = F.conv2d(x, layer.weight, layer.bias, 1, 1)
    out = layer(x)
    assert torch.equal(out, dense)
    (g_gated,) = torch.autograd.grad(out.sum(), x)
    (g_dense,) = torch.autograd.grad(dense.sum(), x)
    assert torch.equal(g_gated, g_dense)
    ops = _ops(layer, x.detach())
    assert not any("ispc" in o for o in ops) and any("conv" in o for o in ops)


def test_a_layer_that_drops_channels_stays_one_opaque_op():
    layer = _layer("topk", 0.0, 4)
    x = torch.randn(2, 8, 5, 5)
    assert any("ispc.gated_conv2d" in o for o in _ops(layer, x))
    assert torch.allclose(layer(x), layer.reference(x), atol=1e-5)
    layer.k = 8  # passes may change k or the threshold after construction: the check follows them
    assert torch.equal(layer(x), F.conv2d(x, layer.weight, layer.bias, 1, 1))
