"""passes/rank.py: threshold and k choice, and the global (network-wide) allocation."""
from __future__ import annotations

import pytest
import torch

import ispc
from conftest import rel_err
from ispc.examples import models as M
from ispc.passes.rank import choose_threshold, global_thresholds, kept_counts


def _kept_macs(samples, weights, thresholds):
    """Fraction of the layers' MACs kept on the samples under the given thresholds."""
    kept = sum(weights[k] * float(kept_counts(s, "threshold", thresholds[k], 0).mean()) / s.shape[1]
               for k, s in samples.items())
    return kept / sum(weights.values())


def test_choose_threshold_keeps_the_ratio():
    s = torch.rand(200, 32, generator=torch.Generator().manual_seed(0))
    for keep in (0.1, 0.5, 0.9):
        t = choose_threshold(s, keep)
        assert abs(float((s >= t).float().mean()) - keep) < 0.01
    assert choose_threshold(s, 1.0) == 0.0


@pytest.mark.parametrize("keep", [0.2, 0.45, 0.7])
def test_global_thresholds_meet_the_mac_budget(keep):
    g = torch.Generator().manual_seed(1)
    samples = {"a": torch.rand(300, 16, generator=g) * 5,       # scale differs: normalized away
               "b": torch.rand(300, 64, generator=g) * 0.01,
               "c": torch.rand(150, 32, generator=g)}
    weights = {"a": 1e6, "b": 4e6, "c": 2e6}
    t = global_thresholds(samples, weights, keep)
    assert abs(_kept_macs(samples, weights, t) - keep) < 0.01
    assert global_thresholds(samples, weights, 1.0) == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_global_thresholds_prune_sparse_layers_more():
    """A layer whose channels are mostly negligible per input gives up more than a uniform one."""
    g = torch.Generator().manual_seed(2)
    dense_like = torch.rand(400, 32, generator=g) + 0.5                # every channel matters
    sparse = torch.rand(400, 32, generator=g)
    sparse[torch.rand(400, 32, generator=g) < 0.7] *= 1e-3             # 70% negligible per input
    samples, weights = {"dense": dense_like, "sparse": sparse}, {"dense": 1.0, "sparse": 1.0}
    t = global_thresholds(samples, weights, 0.55)
    frac = {k: float(kept_counts(s, "threshold", t[k], 0).mean()) / 32 for k, s in samples.items()}
    assert frac["sparse"] < 0.35 < 0.7 < frac["dense"], frac
    assert abs(_kept_macs(samples, weights, t) - 0.55) < 0.01


def test_global_thresholds_drop_exact_zeros_and_handle_dead_layers():
    s = torch.zeros(10, 8)
    s[:, :4] = 1.0
    t = global_thresholds({"x": s, "dead": torch.zeros(10, 8)}, {"x": 1.0, "dead": 1.0}, 0.9)
    assert t["x"] > 0 and t["dead"] > 0  # zeros never kept
    assert float(kept_counts(s, "threshold", t["x"], 0).mean()) == 4


def _data(n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(n_batches)]


def test_global_allocation_end_to_end():
    model = M.resnet20(num_classes=10).eval()
    for keep, mode in ((0.5, "threshold"), (0.5, "topk")):
        cfg = ispc.GatingConfig(keep_ratio=keep, mode=mode, allocation="global")
        compiled = ispc.compile(model, _data(), config=cfg, progress=False)
        gated = compiled.report.gated_layers
        assert gated
        fractions = [r.kept_fraction for r in gated]
        kept = sum(r.macs * r.kept_fraction for r in gated) / sum(r.macs for r in gated)
        assert abs(kept - keep) < 0.06, (mode, kept)
        assert max(fractions) - min(fractions) > 0.05  # non-uniform by construction
        assert compiled.config.allocation == "global"
    full = ispc.compile(model, _data(1), config=ispc.GatingConfig(keep_ratio=1.0, allocation="global"),
                        progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(full(x), model(x)) <= 1e-4


def test_global_allocation_needs_calibration_data():
    with pytest.raises(ispc.ConfigError, match="calibration"):
        ispc.compile(M.resnet20(num_classes=10).eval(), None, progress=False,
                     config=ispc.GatingConfig(mode="topk", allocation="global"))


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_layer_keep_ratios_override_the_keep_ratio(mode):
    model = M.resnet20(num_classes=10).eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode=mode, prune_dead=False, layer_keep_ratios={
        "layer3.*": 0.25, "layer3.2.conv2": 1.0, "layer1.0.conv1": 0.75})
    compiled = ispc.compile(model, _data(), config=cfg, progress=False)
    rows = {r.name: r for r in compiled.report.layers}
    assert not rows["layer3.2.conv2"].gated
    assert rows["layer3.2.conv2"].reason == "kept dense by layer_keep_ratios (1.0)"
    assert "layer3.2.conv2" not in compiled.gated_modules()
    for name, keep in (("layer3.0.conv1", 0.25), ("layer3.1.conv2", 0.25), ("layer1.0.conv1", 0.75),
                       ("layer2.1.conv1", 0.5)):
        assert rows[name].gated and abs(rows[name].kept_fraction - keep) < 0.04, (name, keep)
    if mode == "topk":
        assert rows["layer3.0.conv1"].k == 8 and rows["layer1.0.conv1"].k == 12


def test_layer_keep_ratios_with_global_allocation_spread_the_rest():
    model = M.resnet20(num_classes=10).eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5, allocation="global", prune_dead=False,
                            calibration_rounds=6, layer_keep_ratios={"layer3.*": 0.9})
    compiled = ispc.compile(model, _data(), config=cfg, progress=False)
    pooled = [r for r in compiled.report.gated_layers if not r.name.startswith("layer3.")]
    kept = sum(r.macs * r.kept_fraction for r in pooled) / sum(r.macs for r in pooled)
    assert abs(kept - 0.5) < 0.06
    assert all(abs(r.kept_fraction - 0.9) < 0.07 for r in compiled.report.gated_layers
               if r.name.startswith("layer3."))


def test_layer_keep_ratios_without_calibration_data():
    model = M.resnet20(num_classes=10).eval()
    cfg = ispc.GatingConfig(mode="topk", keep_ratio=0.5, layer_keep_ratios={"layer2.*": 0.25,
                                                                           "layer1.0.conv1": 1.0})
    rows = {r.name: r for r in ispc.compile(model, None, config=cfg, progress=False).report.layers}
    assert rows["layer2.1.conv1"].k == 8 and rows["layer3.0.conv1"].k == 16
    assert not rows["layer1.0.conv1"].gated


@pytest.mark.parametrize("pattern,msg", [
    ("layer9.*", "matches no gateable layer: the gateable layers are: layer1.0.conv1"),
    ("conv1", "it matches only 'conv1', which cannot be gated \\(too few input channels"),
])
def test_layer_keep_ratios_pattern_that_matches_nothing(pattern, msg):
    with pytest.raises(ispc.ConfigError, match=msg) as info:
        ispc.compile(M.resnet20(num_classes=10).eval(), _data(1), progress=False,
                     config=ispc.GatingConfig(layer_keep_ratios={pattern: 0.5}))
    assert "fix the pattern" in str(info.value) and "\n" not in str(info.value)
