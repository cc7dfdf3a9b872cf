"""passes/refine.py: thresholds re-chosen with the gates in place keep each layer's own ratio."""
from __future__ import annotations

import pytest
import torch

import ispc
from ispc.examples import models as M
from ispc.passes import records
from ispc.passes.rank import choose_threshold
from ispc.passes.refine import refine_rounds
from ispc.pipeline import run


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]


@pytest.mark.parametrize("rounds", [0, 6])
def test_refine_keeps_per_layer_ratios_on_the_gated_inputs(rounds):
    """With refinement the kept fraction on what each gated layer really sees is its own ratio;
    without it, the thresholds chosen on the dense model drift (upstream layers are gated). An
    untrained ResNet-20 drifts far: each round settles about one more stage."""
    model = M.resnet20(num_classes=10).eval()
    ratios = {"layer1.*": 0.3, "layer2.*": 0.6, "layer3.*": 0.45}
    cfg = ispc.GatingConfig(layer_keep_ratios=ratios, calibration_rounds=rounds, prune_dead=False)
    data = _data()
    compiled = ispc.compile(model, data, config=cfg, progress=False)
    measured = compiled.measure(data, progress=False)["layers"]
    errors = []
    for name, m in compiled.gated_modules().items():
        want = cfg.layer_keep_ratio(name)
        errors.append(abs(measured[name]["kept_fraction"] - want))
    if rounds:
        assert max(errors) < 0.03
    else:
        assert max(errors) > 0.03  # the drift refinement corrects


def test_refine_rounds_returns_the_last_samples():
    cfg = ispc.GatingConfig(layer_keep_ratios={"layer2.*": 0.5}, calibration_rounds=1)
    gm, state = run(M.resnet20(num_classes=10).eval(), _data(), config=cfg,
                    pipeline=("capture", "fold_bn", "linear_as_conv", "find_sites", "calibrate",
                              "rank", "insert_gates"), progress=False)
    nodes = {n.target: n for n in gm.graph.nodes
             if records(n).gate is not None and records(n).gate.gated}
    samples = refine_rounds(gm, nodes, cfg, state.calibration_cache)
    assert set(samples) == set(nodes)
    for name, rows in samples.items():
        assert rows.shape[0] == 64
        assert records(nodes[name]).gate.threshold == choose_threshold(rows, cfg.layer_keep_ratio(name)
                                                                      or cfg.keep_ratio)
