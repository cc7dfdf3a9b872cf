"""The test-model zoo itself: every model traces, matches eager, and has the structure it claims."""

import operator
from collections.abc import Iterator

import pytest
import torch
import torch.fx
from torch import nn

import zoo  # tests/ is put on sys.path by tests/conftest.py


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny convs on a shared 2-core box run faster (and steadier) on one thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


TINY = {
    "efficientnet": zoo.TinyEfficientNet,
    "densenet": zoo.TinyDenseNet,
    "regnet": zoo.TinyRegNet,
    "convnext": zoo.TinyConvNeXt,
    "shufflenet": zoo.TinyShuffleNet,
    "mixed": zoo.TinyMixed,
}


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(model)


def _functions(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _methods(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_method"}


def _modules(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_traces_and_matches_eager(name: str) -> None:
    model = zoo.ZOO[name]()
    assert model.training  # factories follow the nn.Module convention
    model.eval()
    x = zoo.example_input(*zoo.INPUT_SHAPE[:1], size=zoo.INPUT_SHAPE[-1], seed=1)
    with torch.no_grad():
        eager = model(x)
        traced = _trace(model)
        out = traced(x)
    assert eager.shape == (zoo.INPUT_SHAPE[0], 10)
    assert torch.isfinite(eager).all()
    # calibrated BNs keep logits well away from zero, so allclose-based tests can see errors
    assert eager.abs().mean() > 1e-2
    assert not torch.allclose(eager[0], eager[1])
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_models_are_small_and_seeded(name: str) -> None:
    cls = TINY[name]
    a, b, c = cls(seed=0), cls(seed=0), cls(seed=1)
    for m in a.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels <= 64 and m.out_channels <= 64
        if isinstance(m, nn.Linear):
            assert m.in_features <= 64 and m.out_features <= 64
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_factories_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.ZOO["resnet20"]()
    zoo.TinyMixed(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_zoo_factories_are_deterministic() -> None:
    a, b = zoo.ZOO["shufflenet"](), zoo.ZOO["shufflenet"]()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_realistic_bn_is_not_identity() -> None:
    model = zoo.ZOO["resnet20"]()
    bn = model.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    assert bn.momentum == 0.1  # restored after calibration


def test_randomize_norm_changes_eval_output() -> None:
    model = zoo.TinyRegNet(seed=0).eval()
    x = zoo.example_input()
    before = model(x)
    zoo.randomize_norm_(model, seed=3)
    assert not torch.allclose(model(x), before)


def test_efficientnet_structure() -> None:
    model = zoo.TinyEfficientNet().eval()
    dw = [m for m in _modules(model, nn.Conv2d) if m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert _modules(model, nn.SiLU) and _modules(model, nn.Sigmoid)
    assert len(_modules(model, zoo.SqueezeExcitation)) == 5
    sd = _modules(model, zoo.StochasticDepth)
    assert any(m.p > 0 for m in sd)
    gm = _trace(model)
    # torch.fx.wrap keeps stochastic_depth as a leaf call, as with torchvision
    assert sum(n.target is zoo.stochastic_depth for n in gm.graph.nodes) == 3  # one per residual MBConv
    assert operator.mul in _functions(gm)  # SE scale * input


def test_stochastic_depth_only_acts_in_training() -> None:
    x = torch.ones(64, 4, 2, 2)
    layer = zoo.StochasticDepth(0.5, "row")
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    per_row = y.flatten(1)
    assert set(per_row.unique().tolist()) == {0.0, 2.0}  # rows dropped or scaled by 1/(1-p)
    assert torch.all(per_row == per_row[:, :1])
    with pytest.raises(ValueError):
        zoo.stochastic_depth(x, 1.5, "row")


def test_densenet_structure() -> None:
    model = zoo.TinyDenseNet().eval()
    gm = _trace(model)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 6 + 2  # one per dense layer plus one per block output
    trans = model.features.transition1
    assert [type(m) for m in trans] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.AvgPool2d]
    assert trans.conv.kernel_size == (1, 1)


@pytest.mark.parametrize("se", [True, False])
def test_regnet_structure(se: bool) -> None:
    model = zoo.TinyRegNet(se=se)
    grouped = [m for m in _modules(model, nn.Conv2d) if m.groups > 1]
    assert grouped
    for m in grouped:
        assert m.in_channels // m.groups == 8 and m.groups < m.in_channels  # groups = width // group_width
    assert bool(_modules(model, zoo.SqueezeExcitation)) is se
    gm = _trace(model.eval())
    assert operator.add in _functions(gm)


def test_convnext_structure() -> None:
    model = zoo.TinyConvNeXt().eval()
    stem = model.downsample_layers[0][0]
    assert stem.kernel_size == (4, 4) and stem.stride == (4, 4)
    assert all(isinstance(d[0], zoo.LayerNorm2d) and d[1].stride == (2, 2) for d in model.downsample_layers[1:])
    block = model.stages[0][0]
    assert block.dwconv.kernel_size == (7, 7) and block.dwconv.groups == block.dwconv.in_channels
    assert isinstance(block.norm, nn.LayerNorm) and isinstance(block.act, nn.GELU)
    assert block.pwconv1.out_features == 4 * block.pwconv1.in_features
    assert isinstance(block.gamma, nn.Parameter) and block.gamma.shape == (block.dwconv.in_channels,)
    gm = _trace(model)
    assert "permute" in _methods(gm)
    assert any(n.op == "get_attr" and n.target.endswith("gamma") for n in gm.graph.nodes)
    # LayerNorm2d must match a per-pixel LayerNorm over channels
    ln = model.downsample_layers[1][0]
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, ln.normalized_shape[0], 3, 3)
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(ln(x), ref.permute(0, 3, 1, 2))


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert zoo.channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert zoo.channel_shuffle(x, 3).flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]


def test_shufflenet_structure() -> None:
    model = zoo.TinyShuffleNet().eval()
    gm = _trace(model)
    methods = _methods(gm)
    assert {"view", "transpose", "reshape", "size", "chunk"} <= methods
    assert torch.split in _functions(gm) and torch.cat in _functions(gm)


def test_mixed_structure() -> None:
    model = zoo.TinyMixed().eval()
    assert model.conv_reflect.padding_mode == "reflect"
    assert model.conv_dilated.dilation == (2, 2)
    assert (model.conv_dilated.in_channels, model.conv_dilated.out_channels) == (13, 29)
    assert model.conv_strided.stride == (2, 2)
    assert model.conv_nobias.bias is None
    gm = _trace(model)
    conv_calls = [n for n in gm.graph.nodes if n.target is nn.functional.conv2d]
    assert len(conv_calls) == 1
    assert conv_calls[0].args[1].op == "get_attr" and conv_calls[0].args[1].target == "func_weight"
    assert isinstance(model.fc, nn.Linear)


def test_untraceable_fails_in_named_submodule() -> None:
    model = zoo.Untraceable().eval()
    x = zoo.example_input()
    assert model(x).shape == (2, 10)  # eager runs (either branch)
    assert model(-x).shape == (2, 10)
    assert isinstance(model.get_submodule("router"), zoo.DataDependentBlock)
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)
    # the rest of the model is fine: the failure is local to ``router``
    torch.fx.symbolic_trace(model.stem)
    assert "Untraceable" not in zoo.ZOO


def test_swin_structure_windows_shift_and_relative_bias() -> None:
    model = zoo.TinySwin().eval()
    blocks = [m for m in model.modules() if isinstance(m, zoo.SwinBlock)]
    assert [b.attn.shift_size for b in blocks] == [[0, 0], [2, 2], [0, 0], [2, 2]]
    attn = blocks[0].attn
    assert attn.relative_position_bias_table.shape == (49, 2)
    assert attn.relative_position_index.shape == (16 * 16,) and int(attn.relative_position_index.max()) == 48
    # torch.fx keeps the attention one call (torchvision wraps it), its Linear layers inside
    gm = _trace(model)
    assert sum(n.target is zoo.shifted_window_attention for n in gm.graph.nodes) == 4
    # without a shift, a token attends within its 4x4 window only
    x = torch.randn(1, 8, 8, 16)
    y = torch.randn(1, 8, 8, 16)
    y[:, :4, :4] = x[:, :4, :4]
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[:, :4, :4], attn(y)[:, :4, :4])
        shifted = blocks[1].attn
        assert not torch.allclose(shifted(x)[:, :4, :4], shifted(y)[:, :4, :4])
    merge = model.features[2]
    assert merge.reduction.in_features == 4 * 16 and merge.reduction.bias is None


def test_vit_structure_class_token_and_attention() -> None:
    model = zoo.TinyViT().eval()
    assert model.class_token.shape == (1, 1, 32) and model.pos_embedding.shape == (1, 17, 32)
    assert all(isinstance(b.self_attention, nn.MultiheadAttention) for b in model.layers)
    gm = _trace(model)
    assert any(n.op == "call_module" and n.target.endswith("self_attention") for n in gm.graph.nodes)
    x = zoo.example_input()
    with torch.no_grad():
        before = model(x)
        model.class_token.add_(1.0)
        assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("grid", [False, True])
def test_maxvit_partitions_round_trip(grid: bool) -> None:
    layer = zoo.PartitionAttentionLayer(32, 4, grid=grid)
    x = torch.randn(2, 32, 8, 8)
    parts = layer._partition(x)
    assert parts.shape == (2, 4, 16, 32)
    torch.testing.assert_close(layer._departition(parts, 8, 8), x, rtol=0, atol=0)
    # a window holds neighbours, a grid cell pixels h // p apart
    first = parts[0, 0, :, 0]
    expect = x[0, 0, ::2, ::2] if grid else x[0, 0, :4, :4]
    torch.testing.assert_close(first, expect.flatten(), rtol=0, atol=0)


def test_rexnet_partial_residual_and_ghost_slice() -> None:
    block = zoo.LinearBottleneck(16, 24, 1, 2.0, True).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block(x)
        inner = block.conv_pwl(block.act_dw(block.se(block.conv_dw(block.conv_exp(x)))))
    torch.testing.assert_close(out[:, :16], inner[:, :16] + x)
    torch.testing.assert_close(out[:, 16:], inner[:, 16:])
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(zoo.TinyReXNet())  # ispc captures it with torch.export
    ghost = zoo.GhostModule(8, 13)
    assert ghost(torch.randn(1, 8, 4, 4)).shape == (1, 13, 4, 4)


def test_families_cover_torchvision_and_timm() -> None:
    assert set(zoo.FAMILIES) >= {
        "resnet", "resnext", "wide_resnet", "vgg", "mobilenet_v2", "mobilenet_v3", "efficientnet",
        "efficientnet_v2", "regnet", "densenet", "googlenet", "shufflenet", "squeezenet", "mnasnet",
        "convnext", "swin", "maxvit", "vit", "dla", "dpn", "ghostnet", "rexnet"}
    grouped = [m for m in zoo.FAMILIES["resnext"]().modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped
