import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err

import ispc
from ispc.records import records
from ispc.benchmark import dense_baseline
from ispc.examples.models import create_model
from ispc.modules import ChannelsLastMaxPool2d, StridedMaxPool2d


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 0, 1, True),
    (3, 2, 1, 2, False), ((3, 2), (2, 1), (1, 0), 1, True)])
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (3, 5, 17, 13), (2, 16, 8, 9)])
def test_channels_last_pool_equals_plain_pool(kernel, stride, padding, dilation, ceil, shape):
    plain = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    fast = ChannelsLastMaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = fast(x)
    assert torch.equal(out, plain(x))
    assert out.is_contiguous()  # NCHW back for the layers after it


def test_channels_last_pool_plain_path_for_other_inputs():
    fast = ChannelsLastMaxPool2d(2)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(fast(x.transpose(2, 3)), nn.MaxPool2d(2)(x.transpose(2, 3)))  # strided
    assert torch.equal(fast(x[0]), nn.MaxPool2d(2)(x[0]))  # 3-d
    xg = x.clone().requires_grad_()
    fast(xg).sum().backward()  # differentiable on either path
    assert xg.grad.sum().item() == pytest.approx(2 * 4 * 4 * 4)


@pytest.mark.parametrize("kernel,ceil", [(2, False), (3, False), ((2, 3), False), (1, False), (2, True),
                                         (3, True)])
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (3, 5, 17, 13), (2, 16, 8, 9), (1, 3, 2, 2)])
def test_strided_pool_equals_plain_pool(kernel, ceil, shape):
    plain = nn.MaxPool2d(kernel, ceil_mode=ceil)
    fast = StridedMaxPool2d(kernel, ceil_mode=ceil)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    x[..., 1::2] = x[..., 0:x.shape[-1] - 1:2]  # ties inside windows
    try:
        expected = plain(x)
    except RuntimeError as e:  # input smaller than a window: the plain module's error, unchanged
        with pytest.raises(RuntimeError, match="too small"):
            fast(x)
        assert "too small" in str(e)
        return
    out = fast(x)
    assert torch.equal(out, expected)
    assert out.is_contiguous()
    cl = x.contiguous(memory_format=torch.channels_last)  # keeps the input's layout, like max_pool2d
    assert torch.equal(fast(cl), plain(x))
    assert fast(cl).is_contiguous(memory_format=torch.channels_last) == plain(cl).is_contiguous(
        memory_format=torch.channels_last)


def test_strided_pool_propagates_nan_and_handles_other_dtypes():
    x = torch.randn(2, 3, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    assert torch.equal(StridedMaxPool2d(2)(x).isnan(), nn.MaxPool2d(2)(x).isnan())
    xi = torch.randint(-50, 50, (2, 3, 6, 6), dtype=torch.int64)
    assert torch.equal(StridedMaxPool2d(3)(xi), F.max_pool2d(xi.double(), 3).long())
    xh = torch.randn(2, 3, 6, 6).bfloat16()
    assert torch.equal(StridedMaxPool2d(2)(xh), nn.MaxPool2d(2)(xh))


def test_strided_pool_plain_path_for_autograd_and_3d():
    fast = StridedMaxPool2d(2)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(fast(x[0]), nn.MaxPool2d(2)(x[0]))  # 3-d: the plain module
    xg = x.clone().requires_grad_()
    fast(xg).sum().backward()  # autograd: max_pool2d's gradient (one element per window)
    assert xg.grad.sum().item() == pytest.approx(2 * 4 * 4 * 4)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2), dict(kernel_size=2, padding=1),
                                    dict(kernel_size=2, dilation=2),
                                    dict(kernel_size=2, return_indices=True)])
def test_strided_pool_refuses_overlapping_windows(kwargs):
    with pytest.raises(ValueError, match="stride == kernel_size"):
        StridedMaxPool2d(**kwargs)
    assert not StridedMaxPool2d.non_overlapping(nn.MaxPool2d(**kwargs))


@pytest.mark.parametrize("name,pool_type,tags", [
    # 3x3/2 stem pool, the classifier's global average pool
    ("resnet18", ChannelsLastMaxPool2d, {"channels_last_max_pool", "global_avg_pool"}),
    ("vgg11_bn", StridedMaxPool2d, {"strided_max_pool"}),  # 2x2/2 pools (its 7x7 average: kept)
])
def test_compile_lowers_pools_and_baseline_matches(name, pool_type, tags):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = ispc.compile(model, [x], config=ispc.GatingConfig(keep_ratio=1.0))
    pools = [m for m in compiled.graph_module.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is pool_type for m in pools)
    assert all(type(m) is nn.MaxPool2d for m in model.modules() if isinstance(m, nn.MaxPool2d))
    lowered = {records(n).lowered for n in compiled.graph_module.graph.nodes
               if records(n).lowered}
    assert lowered == tags
    base = dense_baseline(model, x)
    assert any(type(m) is pool_type for m in base.modules())
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(base(x), ref, rtol=1e-4, atol=1e-4)


def test_return_indices_pool_is_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            y, idx = self.pool(self.conv(x))
            return y + idx.float() * 0

    compiled = ispc.compile(Net().eval(), [torch.randn(2, 3, 8, 8)],
                            config=ispc.GatingConfig(keep_ratio=1.0))
    assert type(compiled.graph_module.pool) is nn.MaxPool2d


def test_exported_graph_has_the_plain_pool():
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = ispc.compile(model, [x], config=ispc.GatingConfig(keep_ratio=0.5))
    ep = ispc.export_program(compiled, x)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("max_pool2d" in t for t in targets)
    assert not any("clone" in t or "contiguous" in t for t in targets)


@pytest.mark.parametrize("act, ref", [("relu", torch.relu), ("relu6", F.relu6)])
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (2, 3, 9, 37), (1, 5, 4, 2), (3, 2, 7, 70)])
def test_strided_pool_with_an_activation_equals_pool_then_activation(act, ref, shape):
    fast = StridedMaxPool2d(2)
    fast.act = act
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 8
    x[0, 0, 0, 0] = float("nan")  # NaN propagates through max and activation alike
    expected = ref(F.max_pool2d(x, 2))
    out = fast(x)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    xg = x.clone().requires_grad_()  # the plain path applies it too
    assert torch.equal(fast(xg).detach().nan_to_num(), expected.nan_to_num())
    three = StridedMaxPool2d(3)  # other windows: PyTorch's maxima, then the activation
    three.act = act
    if min(shape[-2:]) >= 3:
        assert torch.equal(three(x).nan_to_num(), ref(F.max_pool2d(x, 3)).nan_to_num())
    assert f"act={act}" in repr(fast)


@pytest.mark.parametrize("act, ref", [(None, lambda t: t), ("relu", torch.relu), ("relu6", F.relu6)])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    (3, 2, 1, 1, False), (3, 1, 1, 1, False), (3, 2, 0, 1, True), (3, 2, 1, 2, False)])
def test_channels_last_pool_on_channels_last_maps_with_an_activation(act, ref, kernel, stride, padding,
                                                                     dilation, ceil):
    # the native path (floor mode, no dilation) and PyTorch's (the others) give the same result,
    # channels-last, the activation after the max
    fast = ChannelsLastMaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    fast.act = act
    x = torch.randn(2, 20, 15, 17, generator=torch.Generator().manual_seed(3)) * 8
    x[0, 1, 2, 3] = float("nan")
    want = ref(F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil))
    for inp in (x.contiguous(memory_format=torch.channels_last), x):
        out = fast(inp)
        assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())
    xg = x.clone().requires_grad_()  # autograd: the plain module, then the activation
    assert torch.equal(fast(xg).detach().nan_to_num(), want.nan_to_num())
    assert (f"act={act}" in repr(fast)) == (act is not None)


def test_the_stem_relu_moves_into_the_channels_last_pool(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 3, 32, 32)]
    c = ispc.compile(model, data, progress=False,
                     config=ispc.GatingConfig(keep_ratio=0.5, mode="topk", channels_last=True,
                                              min_channels=8))
    pools = [m for m in c.graph_module.modules() if isinstance(m, ChannelsLastMaxPool2d)]
    assert len(pools) == 1 and pools[0].act == "relu"
    gm = c.graph_module
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
                   for n in gm.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = c(x)
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    assert [m.act for m in loaded.graph_module.modules() if isinstance(m, ChannelsLastMaxPool2d)] == ["relu"]
    with torch.no_grad():
        # the archive's graph is re-traced by torch.export (nn.Flatten becomes aten.flatten), and
        # the loaded model's native program may then take the classifier in another order of
        # summation: equal to the compiled model's output within float32 rounding, not bitwise
        assert rel_err(loaded(x), got) <= 1e-6
    full = ispc.compile(model, data, progress=False,
                        config=ispc.GatingConfig(keep_ratio=1.0, channels_last=True))
    with torch.no_grad():
        assert (full(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()


class _Heads(nn.Module):
    """A global average pool as a module, as a function (both spellings of 1x1) and one that is not
    global (left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24 * 3, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        a = self.pool(y).flatten(1)
        b = F.adaptive_avg_pool2d(y, 1).flatten(1)
        c = F.adaptive_avg_pool2d(y, (1, 1)).flatten(1)
        d = F.adaptive_avg_pool2d(y, 2).mean((2, 3))
        return self.fc(torch.cat([a, b, c], 1)) + d.sum(1, keepdim=True)


def test_global_avg_pools_are_lowered_and_stay_equal(tmp_path):
    from ispc.modules import GlobalAvgPool2d

    torch.manual_seed(0)
    model = _Heads().eval()
    x = torch.randn(2, 3, 16, 16)
    for cl in (True, False):
        c = ispc.compile(model, [torch.randn(4, 3, 16, 16)], progress=False,
                         config=ispc.GatingConfig(keep_ratio=1.0, channels_last=cl))
        gm = c.graph_module
        pools = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), GlobalAvgPool2d)]
        assert len(pools) == 3 and all(records(n).lowered == "global_avg_pool" for n in pools)
        assert sum(n.op == "call_function" and "adaptive_avg_pool2d" in str(n.target)
                   for n in gm.graph.nodes) == 1  # the 2x2 pool
        with torch.no_grad():
            want = model(x)
            assert (c(x) - want).abs().max() <= 1e-5 * want.abs().max()
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    lgm = loaded.graph_module
    assert sum(n.op == "call_module" and isinstance(lgm.get_submodule(n.target), GlobalAvgPool2d)
               for n in lgm.graph.nodes) == 3
    with torch.no_grad():
        assert (loaded(x) - c(x)).abs().max() <= 1e-6 * c(x).abs().max()


def test_global_avg_pool_module_paths():
    from ispc.modules import GlobalAvgPool2d

    pool = GlobalAvgPool2d()
    x = torch.randn(2, 40, 7, 5)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x.double()):
        want = F.adaptive_avg_pool2d(inp, 1)
        out = pool(inp)
        assert out.dtype == inp.dtype and (out - want).abs().max() <= 1e-6
    xg = x.clone().requires_grad_()
    pool(xg.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert torch.allclose(xg.grad, torch.full_like(x, 1 / 35))


def test_strided_pool_native_window():
    """The windows the pool (and a native program) take, None where the module's own path runs."""
    pool = StridedMaxPool2d(2)
    assert pool.native_window(7, 8) == ((2, 2), (2, 2), (0, 0))  # floor: the last row dropped
    assert pool.native_window(1, 8) is None  # smaller than the window
    ceil = StridedMaxPool2d((2, 3), ceil_mode=True)
    assert ceil.native_window(4, 6) == ((2, 3), (2, 3), (0, 0))
    assert ceil.native_window(5, 6) is None  # a partial window
