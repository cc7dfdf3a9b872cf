"""ispc.modules.GatedConv2d: a layer that keeps every channel is the dense convolution everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ispc.errors import DataError
from ispc.modules import GatedConv2d
from ispc.ops import native


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


@pytest.mark.parametrize("shape", [(8, 5, 5), (2, 8, 5, 5, 1)])
def test_an_unbatched_or_5d_input_is_a_one_line_data_error(shape):
    layer = _layer("topk", 0.0, 4)
    with pytest.raises(DataError, match=r"pass a batch, N x C x H x W \(one image: x.unsqueeze\(0\)\)"):
        layer(torch.randn(*shape))


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("strategy", ["native", "gather", "grouped", "gemm"])
@pytest.mark.parametrize("act", ["relu", "relu6", None])
@pytest.mark.parametrize("residual_shape, dtype", [(None, None), ((3, 16, 6, 6), torch.float32),
                                                   ((1, 16, 1, 1), torch.float32),
                                                   ((3, 16, 6, 6), torch.float64),
                                                   ((2, 3, 16, 6, 6), torch.float32)])
def test_epilogue_after_the_kernel_equals_the_reference(monkeypatch, strategy, act, residual_shape,
                                                        dtype):
    """The epilogue applied in place on a kernel's output (the native kernel's when too large for
    its own epilogue, every other kernel's): the reference's values, dtype and shape
    (broadcasting and type promotion included), and the caller's input and residual untouched."""
    import ispc.modules as modules

    monkeypatch.setattr(modules, "EPILOGUE_MAX_BYTES", 0)
    torch.manual_seed(0)
    m = GatedConv2d(torch.randn(16, 16, 3, 3), torch.randn(16), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), mode="topk", threshold=0.0, k=8)
    m.requires_grad_(False)
    m.set_strategy(strategy)
    m.residual_add, m.act = True, act
    x = torch.randn(3, 16, 6, 6)
    r = None if residual_shape is None else torch.randn(residual_shape, dtype=dtype) * 3
    x0, r0 = x.clone(), None if r is None else r.clone()
    with torch.no_grad():
        out, ref = m(x, r), m.reference(x, r)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(x, x0) and (r is None or torch.equal(r, r0))


@pytest.mark.parametrize("act", ["relu", "relu6", None])
@pytest.mark.parametrize("residual_shape, dtype", [(None, None), ((2, 6, 5, 5), torch.float32),
                                                   ((1, 6, 1, 1), torch.float32),
                                                   ((2, 6, 5, 5), torch.float64)])
@pytest.mark.parametrize("hw", [5, 3])  # 3: the kernel covers the input, a linear layer's view
def test_keep_all_epilogue_is_the_dense_conv_then_add_and_act(act, residual_shape, dtype, hw):
    """Keeping every channel, the fused epilogue runs on oneDNN's output (in place where it is a
    fresh tensor): exactly the dense convolution, + residual, then the activation; the caller's
    input and residual untouched; with autograd, the same values and gradients."""
    layer = _layer("topk", 0.0, 8)
    layer.residual_add, layer.act = residual_shape is not None, act
    pad = 1 if hw == 5 else 0
    layer.padding, layer._linear_ok = (pad, pad), pad == 0
    x = torch.randn(2, 8, hw, hw)
    out_hw = hw + 2 * pad - 2
    r = (None if residual_shape is None
         else torch.randn(residual_shape[:2] + ((out_hw, out_hw) if residual_shape[-1] > 1 else (1, 1)),
                          dtype=dtype))
    x0, r0 = x.clone(), None if r is None else r.clone()
    def dense(inp):
        y = (F.conv2d(inp, layer.weight, layer.bias, 1, pad) if pad
             else F.linear(inp.flatten(1), layer.weight.flatten(1), layer.bias)[:, :, None, None])
        y = y + r if r is not None else y
        return {"relu": torch.relu, "relu6": F.relu6, None: lambda t: t}[act](y)

    with torch.no_grad():
        got, want = layer(x, r), dense(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(x, x0) and (r is None or torch.equal(r, r0))
    xg, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = layer(xg, r), dense(xd)
    (g,), (gd,) = torch.autograd.grad(out.sum(), xg), torch.autograd.grad(ref.sum(), xd)
    assert torch.equal(out.detach(), want) and torch.equal(g, gd)


@pytest.mark.parametrize("native_pass", [True, False])
def test_epilogue_never_writes_into_the_bias(monkeypatch, native_pass):
    """An instance that keeps no channel gets the bias as a view: the in-place epilogue must not
    clamp the layer's own bias (a 1x1 output makes that view contiguous)."""
    if not native_pass:
        monkeypatch.setattr(native, "available", lambda: False)
    bias = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    m = GatedConv2d(torch.randn(4, 8, 3, 3), bias.clone(), stride=(1, 1), padding=(0, 0),
                    dilation=(1, 1), mode="threshold", threshold=1e9, k=0)
    m.requires_grad_(False)
    m.set_strategy("gather")
    m.act = "relu"
    with torch.no_grad():
        for _ in range(2):
            out = m(torch.randn(1, 8, 3, 3))
            assert torch.equal(out.flatten(), torch.relu(bias))
    assert torch.equal(m.bias, bias)


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("mode, threshold, k", [("topk", 0.0, 5), ("threshold", 0.7, 0),
                                                ("topk", 0.0, 0), ("topk", 0.0, 12)])
@pytest.mark.parametrize("act", ["relu", "relu6", None])
@pytest.mark.parametrize("residual", [None, "channels_last", "nchw"])
@pytest.mark.parametrize("stride, kernel", [(1, 3), (2, 3), (1, 1)])
def test_nhwc_strategy_with_fused_epilogue_equals_the_reference(mode, threshold, k, act, residual,
                                                                stride, kernel):
    """The nhwc kernel on channels-last maps: bias, residual (added in the kernel when it is
    channels-last, after it otherwise) and activation fused; the masked-dense reference's values;
    NCHW inputs run gather. Weights are packed once, by set_strategy, never per call."""
    g = torch.Generator().manual_seed(7 * stride + kernel + k)
    pad = kernel // 2
    layer = GatedConv2d(torch.randn(20, 12, kernel, kernel, generator=g), torch.randn(20, generator=g),
                        stride=(stride, stride), padding=(pad, pad), dilation=(1, 1), mode=mode,
                        threshold=threshold, k=k, scale=torch.rand(12, generator=g) + 0.5)
    layer.act = act
    layer.set_strategy("nhwc", out_hw=25)
    packed = layer.prepared
    assert isinstance(packed, native.NhwcConv) and layer.out_hw == 25
    x = (torch.randn(2, 12, 9, 9, generator=g) * torch.rand(1, 12, 1, 1, generator=g) * 2).contiguous(
        memory_format=torch.channels_last)
    ho = (9 + 2 * pad - kernel) // stride + 1
    r = None if residual is None else torch.randn(2, 20, ho, ho, generator=g)
    if residual == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    r_before = None if r is None else r.clone()
    with torch.no_grad():
        want = layer.reference(x, r)
        got = layer(x, r)
        nchw = layer(x.contiguous(), r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nchw, want, rtol=1e-5, atol=1e-4)
    if not layer.keeps_all:
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert layer.prepared is packed  # no repacking per call
    assert r is None or torch.equal(r, r_before)


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_nhwc_strategy_survives_copy_pickle_and_state_dict():
    import copy
    import pickle

    layer = _layer("topk", 0.0, 4)
    layer.set_strategy("nhwc", out_hw=25)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = layer(x)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert other.strategy == "nhwc" and other.out_hw == 25
            assert torch.equal(other(x), want)
        new = _layer("topk", 0.0, 4)
        new.set_strategy("nhwc")
        new.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})  # repacked
        torch.testing.assert_close(new(x), new.reference(x), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown strategy"):
        layer.set_strategy("nhwcc")


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("cin, cout, kernel, stride, pad, groups", [
    (3, 16, 7, 2, 3, 1), (12, 20, 1, 2, 0, 1), (12, 20, 3, 1, 1, 1), (16, 16, 3, 2, 1, 16),
    (24, 24, 3, 1, 1, 24)])
@pytest.mark.parametrize("act", ["relu", "relu6", None])
@pytest.mark.parametrize("residual", [None, "channels_last", "nchw"])
def test_nhwc_dense_conv_equals_the_convolution_and_its_epilogue(cin, cout, kernel, stride, pad,
                                                                 groups, act, residual):
    from torch import nn

    from ispc.modules import NhwcDenseConv2d, apply_activation

    g = torch.Generator().manual_seed(cin + cout + kernel)
    conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    mod = NhwcDenseConv2d(conv, out_hw=36)
    mod.act = act
    x = torch.randn(2, cin, 11, 11, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x.contiguous())
        r = None if residual is None else torch.randn(ref.shape, generator=g)
        if residual == "channels_last":
            r = r.contiguous(memory_format=torch.channels_last)
        want = apply_activation(ref if r is None else ref + r, act)
        got = mod(x, r)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mod(x.contiguous(), r), want, rtol=1e-5, atol=1e-4)  # PyTorch
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_nhwc_dense_conv_takes_only_what_its_kernels_compute():
    from torch import nn

    from ispc.modules import NhwcDenseConv2d

    assert not NhwcDenseConv2d.fits(nn.Conv2d(8, 8, 3, groups=2))  # grouped, not depthwise
    assert not NhwcDenseConv2d.fits(nn.Conv2d(8, 8, 5, groups=8))  # depthwise 5x5
    assert not NhwcDenseConv2d.fits(nn.Conv2d(8, 8, 3, padding_mode="reflect"))
    assert not NhwcDenseConv2d.fits(nn.Conv2d(8, 8, 3).double())
    if native.available():
        with pytest.raises(ValueError, match="cannot run"):
            NhwcDenseConv2d(nn.Conv2d(8, 8, 3, groups=2))
