"""ispc.modules.GatedLinear: a linear layer over the last dimension of an N x ... x C input, gated
per instance, equals its masked-dense reference ``linear(x * m[n, None, ..., :])`` in every kernel,
mode and context (eager, autograd, export), on random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given
from hypothesis import strategies as st

from conftest import rel_err
from ispc.modules import GatedConv2d, GatedLinear, dense_conv
from ispc.ops import gated_conv as gc
from ispc.ops import linear_kernels as lk
from ispc.ops import native

KERNELS = ([("gemm", None)]
           + ([("native", native.ORIENT_CO), ("native", native.ORIENT_PIX)] if native.available() else [])
           + ([("nhwc", None)] if lk.nhwc_available() else []))


def _layer(c=24, o=40, mode="topk", threshold=0.0, k=10, seed=0, bias=True) -> GatedLinear:
    g = torch.Generator().manual_seed(seed)
    return GatedLinear(torch.randn(o, c, generator=g), torch.randn(o, generator=g) if bias else None,
                       mode=mode, threshold=threshold, k=k)


def _masked_dense(layer: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference written out in float64, with the mask from the RMS over positions."""
    n, c = x.shape[0], x.shape[-1]
    s = x.double().reshape(n, -1, c).pow(2).mean(1).sqrt()
    if layer.mode == "topk":
        m = torch.zeros(n, c, dtype=torch.bool)
        m.scatter_(1, s.topk(layer.k, 1).indices, True)
    else:
        m = s >= layer.threshold
    xm = x.double() * m.reshape(n, *([1] * (x.dim() - 2)), c)
    return F.linear(xm, layer.weight.double().reshape(layer.out_channels, -1), layer.bias.double())


@pytest.mark.parametrize("strategy, orient", KERNELS)
@pytest.mark.parametrize("shape", [(3, 7, 24), (2, 5, 6, 24), (1, 1, 24), (4, 33, 24)])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_kernels_equal_the_masked_dense_reference(strategy, orient, shape, mode):
    layer = _layer(mode=mode, threshold=0.9, k=10)
    layer.set_strategy(strategy, orient)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
        ref = layer.reference(x)
    assert y.shape == (*shape[:-1], 40)
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(y.double(), _masked_dense(layer, x)) <= 1e-5
    assert not torch.allclose(y, F.linear(x, layer.weight.reshape(40, -1), layer.bias), atol=1e-3)


@given(n=st.integers(1, 3), p=st.integers(1, 40), c=st.integers(2, 48), o=st.integers(1, 33),
       keep=st.floats(0.05, 1.0), threshold_mode=st.booleans(), seed=st.integers(0, 2**16),
       kernel=st.sampled_from(KERNELS))
def test_random_shapes_and_gates(n, p, c, o, keep, threshold_mode, seed, kernel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, c, generator=g)
    k = max(1, round(keep * c))
    s = x.reshape(n, -1, c).pow(2).mean(1).sqrt().flatten().sort().values
    threshold = float(s[min(int((1 - keep) * s.numel()), s.numel() - 1)]) * 0.999
    layer = _layer(c, o, "threshold" if threshold_mode else "topk", threshold, k, seed)
    layer.set_strategy(*kernel)
    with torch.no_grad():
        assert rel_err(layer(x), layer.reference(x)) <= 1e-5


def test_an_instance_that_keeps_nothing_gets_the_bias():
    layer = _layer(mode="threshold", threshold=1e9)
    for strategy, orient in KERNELS:
        layer.set_strategy(strategy, orient)
        with torch.no_grad():
            y = layer(torch.randn(2, 3, 24))
        assert torch.equal(y, layer.bias.expand(2, 3, 40))


def test_keep_all_is_the_linear_layer_everywhere():
    layer = _layer(k=24)
    x = torch.randn(2, 5, 24, requires_grad=True)
    dense = F.linear(x, layer.weight.reshape(40, 24), layer.bias)
    out = layer(x)
    assert torch.equal(out, dense)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(dense.sum(), x)[0])
    assert isinstance(dense_conv(layer), torch.nn.Linear)
    assert torch.equal(dense_conv(layer)(x), dense)


def test_exported_and_autograd_paths_are_the_gated_conv_of_the_map_view():
    layer = _layer(k=8)
    x = torch.randn(3, 6, 24)
    ep = torch.export.export(layer, (x,))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.ispc.gated_conv2d.default in ops
    with torch.no_grad():
        eager = layer(x)
        assert rel_err(ep.module()(x), eager) <= 1e-6
    xg = x.clone().requires_grad_(True)
    out = layer(xg)  # autograd: the operator's path, gradients of the masked-dense form
    assert rel_err(out.detach(), eager) <= 1e-6
    (grad,) = torch.autograd.grad(out.sum(), xg)
    m = layer.kept_mask(x)
    assert torch.all(grad[~m[:, None, :].expand_as(grad)] == 0)


def test_map_view_is_the_channels_last_map():
    x = torch.randn(2, 3, 4, 5)
    m = lk.as_map(x)
    assert m.shape == (2, 5, 12, 1) and m.is_contiguous(memory_format=torch.channels_last)
    assert m.data_ptr() == x.data_ptr()
    assert torch.equal(lk.from_map(m, x.shape), x)
    torch.testing.assert_close(gc.channel_saliency(m, torch.ones(5)),
                               x.reshape(2, -1, 5).pow(2).mean(1).sqrt())


def test_sliced_and_subclass_of_the_gated_conv():
    layer = _layer(k=10)
    assert isinstance(layer, GatedConv2d) and layer.in_features == 24 and layer.out_features == 40
    keep_in, keep_out = torch.arange(0, 24, 2), torch.tensor([0, 3, 5])
    s = layer.sliced(in_keep=keep_in, out_keep=keep_out)
    assert isinstance(s, GatedLinear) and s.weight.shape == (3, 12, 1, 1) and s.k == 10
    assert s.ispc_full_channels == (40, 24)
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        assert rel_err(s(x), s.reference(x)) <= 1e-5


def test_fused_residual_epilogue():
    layer = _layer(k=8)
    layer.residual_add = True
    x, r = torch.randn(2, 9, 24), torch.randn(2, 9, 40)
    for strategy, orient in KERNELS:
        layer.set_strategy(strategy, orient)
        with torch.no_grad():
            assert rel_err(layer(x, r), layer.reference(x) + r) <= 1e-5


def test_fused_gelu_epilogue():
    # the channels-last kernel applies the GELU in its epilogue, the others after it in PyTorch;
    # with a residual, gelu(linear + residual); autograd and keep-all paths too
    layer = _layer(k=8)
    layer.act = "gelu"
    x, r = torch.randn(2, 3, 3, 24) * 2, torch.randn(2, 3, 3, 40)
    for strategy, orient in KERNELS:
        layer.set_strategy(strategy, orient)
        layer.residual_add = False
        with torch.no_grad():
            assert rel_err(layer(x), F.gelu(_masked_dense(layer, x).float())) <= 1e-5, strategy
            layer.residual_add = True
            assert rel_err(layer(x, r), F.gelu(_masked_dense(layer, x).float() + r)) <= 1e-5
    assert rel_err(layer.reference(x, r), F.gelu(_masked_dense(layer, x).float() + r)) <= 1e-5
    xg = x.clone().requires_grad_()
    layer(xg, r).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    full = _layer(k=24)
    full.act = "gelu"
    with torch.no_grad():
        assert rel_err(full(x), F.gelu(F.linear(x, full.weight.reshape(40, 24), full.bias))) <= 1e-6


@pytest.mark.skipif(not lk.nhwc_available(), reason="this build has no channels-last native kernel")
def test_nhwc_kernel_slot():
    layer = _layer(k=10)
    layer.set_strategy("nhwc")
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        assert rel_err(layer(x), layer.reference(x)) <= 1e-5


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="gated linear"):
        _layer().set_strategy("im2col")


@pytest.mark.parametrize("strategy", ["gemm", "native"])
def test_eager_output_is_contiguous_as_a_linear_layers(strategy):
    """Code after a linear layer may ``.view`` its output, and elementwise ops run slower on a
    channel-major view: every eager kernel returns ``N x ... x O`` contiguous."""
    if strategy == "native" and not native.available():
        pytest.skip(native.unavailable_reason())
    lin = nn.Linear(32, 48)
    g = GatedLinear(lin.weight, lin.bias, mode="topk", threshold=0.0, k=16)
    g.set_strategy(strategy)
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        y = g(x)
    assert y.shape == (2, 5, 7, 48) and y.is_contiguous()
    assert y.view(2, 35, 48).shape == (2, 35, 48)
