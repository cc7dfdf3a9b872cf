"""GateMasks: the original model trained with a compiled model's gates computes what ispc computes."""
from __future__ import annotations

import pytest
import torch

import ispc
from conftest import rel_err
from ispc.examples.models import resnet20


def _setup(mode="threshold"):
    torch.manual_seed(0)
    model = resnet20().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode=mode, min_channels=16)
    return model, ispc.compile(model, data, config=cfg, progress=False)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_masked_model_equals_the_compiled_model(mode):
    model, compiled = _setup(mode)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with ispc.GateMasks(model, compiled) as masks:
            masked = model(x)
            assert masks.layers == list(compiled.gated_modules())
            masks.enabled = False
            assert torch.equal(model(x), plain)
        gated = compiled(x)
        after = model(x)
    assert rel_err(masked, gated) <= 1e-4  # BatchNorm folding only
    assert rel_err(masked, plain) > 1e-3   # the gates do drop channels
    assert torch.equal(after, plain)       # hooks removed on exit


def test_dropped_channels_get_no_gradient():
    # a chain, so the gated layer's input has no other consumer (in ResNet the shortcut has one)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 16, 3, padding=1)).eval()
    data = [torch.randn(16, 3, 10, 10)]
    compiled = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5), progress=False)
    assert list(compiled.gated_modules()) == ["2"]
    x = torch.randn(4, 3, 10, 10)
    seen = {}

    def keep(mod, args):  # registered before the masks: sees the unmasked input
        args[0].retain_grad()
        seen["x"] = args[0]

    hook = model[2].register_forward_pre_hook(keep)
    with ispc.GateMasks(model, compiled) as masks:
        model(x).square().sum().backward()
        m = masks.mask("2", seen["x"])
    hook.remove()
    assert m.any() and (~m).any()
    grad = seen["x"].grad
    assert torch.all(grad[~m] == 0)
    assert grad[m].abs().sum() > 0


def test_refuses_models_that_do_not_match():
    model, compiled = _setup()
    with pytest.raises(ispc.ConfigError, match="not in this model"):
        ispc.GateMasks(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), compiled)
    dense = ispc.compile(model, config=ispc.GatingConfig(mode="topk", keep_ratio=1.0), progress=False)
    if not dense.gated_modules():
        with pytest.raises(ispc.ConfigError, match="no gated layers"):
            ispc.GateMasks(model, dense)
    with pytest.raises(ispc.ConfigError, match="ispc.compile"):
        ispc.GateMasks(model, model)


def test_gated_linear_layers_mask_the_last_dimension():
    """A ConvNeXt block's pointwise layers (nn.Linear on N x H x W x C): the mask on the original
    model's input is the compiled GatedLinear's, on the channel (last) dimension."""
    import zoo

    model = zoo.ZOO["convnext"]().eval()
    data = [zoo.example_input(8, 32, seed=s) for s in range(2)]
    compiled = ispc.compile(model, data, config=ispc.GatingConfig(mode="topk", min_channels=8),
                            progress=False)
    linears = {n: m for n, m in compiled.gated_modules().items()
               if isinstance(m, ispc.modules.GatedLinear)}
    assert linears
    x = zoo.example_input(3, 32, seed=5)
    seen = {}
    with ispc.GateMasks(model, compiled), torch.no_grad():
        hooks = [model.get_submodule(n).register_forward_pre_hook(  # after the masks' hooks
            lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().clone())) for n in linears]
        model(x)
    for h in hooks:
        h.remove()
    for name, g in linears.items():
        got = seen[name]
        assert got.shape[-1] == g.in_features
        kept = got.reshape(3, -1, g.in_features).abs().sum(1) > 0
        assert kept.sum(1).tolist() == [g.k] * 3
