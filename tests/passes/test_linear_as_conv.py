"""linear_as_conv: linear layers on a flattened map or a vector are gated as convolutions, exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ispc
from conftest import gated_layer_errors, rel_err
from ispc.modules import GatedConv2d, LinearConv2d
from ispc.ops import native

FLATTENS = ["torch.flatten", "view", "reshape", "nn.Flatten"]


class TinyVGG(nn.Module):
    """conv trunk -> flatten (spelled four ways) -> linear -> ReLU -> dropout -> linear."""

    def __init__(self, flatten: str = "torch.flatten") -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.flatten = flatten
        self.flat = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.flatten == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = self.flat(x)
        return self.classifier(x)


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 8, 8, generator=g) for _ in range(n)]


def _compile(model, **kw):
    cfg = ispc.GatingConfig(**{"keep_ratio": 0.5, "mode": "topk", "gate_linear": True, **kw})
    return ispc.compile(model, _data(), config=cfg, progress=False)


def _check_layers_against_reference(compiled, x):
    """Every gated layer's output equals its masked-dense reference on the input it saw."""
    errs = gated_layer_errors(compiled, x)
    assert errs
    for name, err in errs.items():
        assert err <= 1e-5, name


@pytest.mark.parametrize("flatten", FLATTENS)
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_classifier_layers_are_gated_and_match_the_reference(flatten, mode):
    model = TinyVGG(flatten).eval()
    before = copy.deepcopy(model.state_dict())
    c = _compile(model, mode=mode, min_channels=8)
    gated = c.gated_modules()
    assert {"classifier.0", "classifier.3"} <= set(gated)
    assert tuple(gated["classifier.0"].weight.shape) == (64, 32, 4, 4)  # the map's 4x4 per channel
    assert tuple(gated["classifier.3"].weight.shape) == (10, 64, 1, 1)  # a vector: 1x1
    rows = {r.name: r for r in c.report.layers}
    assert rows["classifier.0"].op == "linear" and rows["classifier.0"].gated
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        y = c(x)
    assert y.shape == (5, 10)
    _check_layers_against_reference(c, x)
    if native.available():
        assert gated["classifier.0"].strategy == "native"
        assert gated["classifier.0"].orient == native.ORIENT_FULL
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.classifier[0]) is nn.Linear


def test_keeping_every_channel_equals_the_original():
    model = TinyVGG().eval()
    c = _compile(model, keep_ratio=1.0, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-5


def test_resnet_fc_after_global_pooling_is_a_1x1_layer():
    from ispc.examples.models import resnet20

    model = resnet20().eval()
    data = [torch.randn(4, 3, 32, 32)]
    c = ispc.compile(model, data, config=ispc.GatingConfig(mode="topk", gate_linear=True),
                     progress=False)
    fc = c.gated_modules()["fc"]
    assert tuple(fc.weight.shape) == (10, 64, 1, 1) and fc.k == 32
    x = torch.randn(3, 3, 32, 32)
    _check_layers_against_reference(c, x)


def test_off_by_default_and_why_in_the_report():
    c = ispc.compile(TinyVGG().eval(), _data(), config=ispc.GatingConfig(mode="topk", min_channels=8),
                     progress=False)
    assert not any(n.startswith("classifier") for n in c.gated_modules())
    row = next(r for r in c.report.layers if r.name == "classifier.0")
    assert not row.gated and "gate_linear=True" in row.reason


class Unusual(nn.Module):
    """A linear layer on a 3-d input (gated as it is: a GatedLinear over its last dimension) and
    one called twice (dense): neither is rewritten as a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.tokens = nn.Linear(16, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)    # N x L x 16
        t = self.tokens(t).mean(1)                     # linear on 3-d input
        t = self.shared(F.relu(self.shared(t)))        # shared weights
        return self.head(t)                            # a plain vector: gated


def test_three_d_inputs_are_gated_linears_and_shared_linears_stay_dense():
    model = Unusual().eval()
    c = _compile(model, min_channels=8)
    assert set(n for n in c.gated_modules() if n != "conv") == {"head", "tokens"}
    assert isinstance(c.gated_modules()["tokens"], ispc.modules.GatedLinear)
    assert isinstance(c.gated_modules()["head"], GatedConv2d)
    assert not isinstance(c.gated_modules()["head"], ispc.modules.GatedLinear)
    rows = {r.name: r for r in c.report.layers}
    assert rows["tokens"].gated and not rows["shared"].gated
    assert "shared weights" in rows["shared"].reason
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert c(x).shape == model(x).shape
    _check_layers_against_reference(c, x)


def test_without_calibration_data_linear_layers_stay_dense():
    c = ispc.compile(TinyVGG().eval(), config=ispc.GatingConfig(mode="topk", gate_linear=True,
                                                                 min_channels=8), progress=False)
    assert not any(n.startswith("classifier") for n in c.gated_modules())
    with torch.no_grad():
        assert c(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_latency_aware_leaves_unprofitable_linears_as_linears(monkeypatch):
    import importlib

    sk = importlib.import_module("ispc.passes.kernel_costs")
    # the dense layer always measures fastest: every layer is left dense (deterministically)
    monkeypatch.setattr(sk, "time_candidates", lambda fns, rounds, **kw: {k: 1.0 if k == "dense" else 2.0 for k in fns})
    model = TinyVGG().eval()
    c = _compile(model, latency_aware=True, latency_rounds=1, min_channels=8)
    assert not c.gated_modules()
    gm = c.graph_module
    assert isinstance(gm.get_submodule("classifier.0"), LinearConv2d)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-5


def test_export_and_save_load_keep_the_gated_linears(tmp_path):
    c = _compile(TinyVGG().eval(), min_channels=8)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expect = c(x)
    ep = ispc.export_program(c, (x,))
    assert len(ispc.export.gated_nodes(ep)) == len(c.gated_modules())
    with torch.no_grad():
        assert rel_err(ep.module()(x), expect) <= 1e-5
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    with torch.no_grad():
        assert rel_err(loaded(x), expect) <= 1e-5
    gated = [m for m in loaded.modules() if isinstance(m, GatedConv2d)]
    assert any(tuple(m.weight.shape[-2:]) == (4, 4) for m in gated)


def test_gate_masks_mask_linear_inputs_as_the_compiled_layer_does():
    model = TinyVGG().eval()
    c = _compile(model, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    with ispc.GateMasks(model, c), torch.no_grad():
        masked = model(x)
    with torch.no_grad():
        assert rel_err(masked, c(x)) <= 1e-5
        assert rel_err(model(x), masked) > 1e-3  # the masks did something
