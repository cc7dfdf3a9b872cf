"""The static-pruning baseline: same top-mean-saliency channels for every input, at chosen MACs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from ispc.baselines import STATIC_NOTE, StaticConv2d, StaticPrunedModel, static_prune


def _net(bn: bool = False) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU()]

    net = nn.Sequential(*block(3, 16, 1), *block(16, 24, 2), *block(24, 32, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    if bn:  # non-trivial running statistics, so folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _data(n: int = 24) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 16, 16)
    return [x[i:i + 8] for i in range(0, n, 8)]


def _mean_saliency(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean l2 (RMS) saliency per input channel of each conv, computed directly."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(_m, args, name=name):
                x = args[0]
                s = x.pow(2).mean(dim=(2, 3)).sqrt().sum(0).double()
                sums[name] = sums.get(name, 0) + s
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x in data:
            model(x)
            count += x.shape[0]
    for h in hooks:
        h.remove()
    return {k: v / count for k, v in sums.items()}


def test_keep_one_equals_original() -> None:
    model = _net(bn=True)
    data = _data()
    static = static_prune(model, data, config=ispc.GatingConfig(keep_ratio=1.0), progress=False)
    assert isinstance(static, ispc.CompiledModel) and isinstance(static, StaticPrunedModel)
    mods = static.static_modules()
    assert set(mods) == {"3", "6"}  # the RGB stem has too few channels
    assert all(m.k == m.in_channels for m in mods.values())
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(static(x), model(x), rtol=1e-5, atol=1e-5)
    assert static.measure([x], progress=False)["mac_reduction"] == pytest.approx(0.0, abs=1e-12)


def test_half_keeps_top_mean_channels_for_every_input() -> None:
    model = _net()
    data = _data()
    static = static_prune(model, data, config=ispc.GatingConfig(keep_ratio=0.5), progress=False)
    means = _mean_saliency(model, data)
    x = torch.randn(6, 3, 16, 16)
    for name, m in static.static_modules().items():
        assert isinstance(m, StaticConv2d) and m.k == m.in_channels // 2
        top = torch.topk(means[name], m.k).indices.sort().values
        assert torch.equal(m.index, top)
        mask = m.kept_mask(x)
        assert mask.shape == (6, m.in_channels) and bool((mask == mask[0]).all())
        row = static.report.layer(name)
        assert row.gated and row.k == m.k and row.reason == STATIC_NOTE
        assert row.kept_fraction == pytest.approx(0.5)
    assert static.report.summary["method"] == "static"
    measured = static.measure([x], progress=False)
    assert all(v["kept_fraction"] == pytest.approx(0.5) for v in measured["layers"].values())
    assert measured["mac_reduction"] == pytest.approx(static.report.summary["mac_reduction"])
    # half of each pruned layer's inputs, and the layers computing them drop the other half of
    # their outputs: more than half of those MACs, less than three quarters of the model's
    assert 0.5 < measured["mac_reduction"] < 0.75


def test_output_equals_masked_dense_with_the_fixed_mask() -> None:
    model = _net()
    data = _data()
    static = static_prune(model, data, keep_fractions={"2": 0.5, "4": 0.25}, progress=False)
    mods = static.static_modules()
    assert {n: m.k for n, m in mods.items()} == {"2": 8, "4": 6}
    assert static.report.layer("2").gated and static.report.layer("4").gated
    masks = {n: m.kept_mask(torch.zeros(1, m.in_channels, 1, 1))[0] for n, m in mods.items()}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, mask=mask: (args[0] * mask.view(1, -1, 1, 1).to(args[0].dtype),))
        for n, mask in masks.items()]
    x = torch.randn(7, 3, 16, 16)
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        out = static(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    measured = static.measure([x], progress=False)
    assert measured["layers"]["2"]["kept_fraction"] == 0.5
    assert measured["layers"]["4"]["kept_fraction"] == 0.25
    assert measured["mac_reduction"] == pytest.approx(static.report.summary["mac_reduction"])


def test_matches_an_ispc_point_and_refuses_mistakes() -> None:
    model = _net()
    data = _data()
    fast = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5), progress=False)
    got = fast.measure(data, progress=False)
    fractions = {n: v["kept_fraction"] for n, v in got["layers"].items()}
    static = static_prune(model, data, keep_fractions=fractions, progress=False)
    # at the same fractions the static model also drops producer outputs: fewer MACs than ispc
    assert static.measure(data, progress=False)["mac_reduction"] > got["mac_reduction"] + 0.02
    matched = static_prune(model, data, keep_fractions=fractions, progress=False,
                           match_mac_reduction=got["mac_reduction"])
    assert matched.measure(data, progress=False)["mac_reduction"] == pytest.approx(
        got["mac_reduction"], abs=0.03)
    with pytest.raises(ispc.ConfigError, match="give them too"):
        static_prune(model, data, match_mac_reduction=0.3)
    from ispc.benchmark import benchmark

    res = benchmark(model, static, (3, 16, 16), rounds=2, warmup=1, progress=False)
    assert res[0].realized_speedup > 0
    with pytest.raises(ispc.ConfigError, match="cannot be pruned"):
        static_prune(model, data, keep_fractions={"0": 0.5}, progress=False)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ispc.ConfigError, match=r"\[0, 1\]"):
            static_prune(model, data, keep_fractions={"2": bad}, progress=False)
    assert static_prune(model, data, keep_fractions={"2": 0.0}, progress=False).static_modules()["2"].k == 1
    with pytest.raises(ispc.DataError):
        static_prune(model, None)


def test_layers_computing_only_pruned_channels_are_pruned_too() -> None:
    # "2" keeps 8 of its 16 inputs: the stem "0" (read only by "2", through a ReLU) computes just
    # those 8; "4" keeps 6 of 24, so "2" computes 6 outputs. MACs count what was removed.
    model = _net()
    data = _data()
    static = static_prune(model, data, keep_fractions={"2": 0.5, "4": 0.25}, progress=False)
    gm = static.graph_module
    assert gm.get_submodule("0").out_channels == 8 and gm.get_submodule("2").out_channels == 6
    assert gm.get_submodule("4").out_channels == 32  # read by the pooling and classifier
    rows = {r.name: r for r in static.report.layers}
    assert rows["0"].out_pruned == 8 and rows["2"].out_pruned == 18
    m = static.measure(data, progress=False)
    full = sum(r.macs for r in static.report.layers)
    assert m["dense_macs"] == pytest.approx(full)
    stem, l2, l4, fc = (rows[n].macs for n in ("0", "2", "4", "8"))
    expect = stem * 0.5 + l2 * 0.5 * 0.25 + l4 * 0.25 + fc
    assert m["executed_macs"] == pytest.approx(expect)
    assert m["mac_reduction"] == pytest.approx(static.report.summary["mac_reduction"])
