"""dense_kernels: ungated convolutions of channels-last models on ispc's channels-last kernels."""
from __future__ import annotations

import pytest
import torch

import ispc
from conftest import rel_err
from ispc.examples.models import mobilenet_v2_cifar, resnet20
from ispc.modules import NhwcDenseConv2d
from ispc.ops import native
from ispc.passes import kernel_costs
from ispc.records import records

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]


def _dense_nhwc(c) -> dict[str, NhwcDenseConv2d]:
    return {n: m for n, m in c.graph_module.named_modules() if isinstance(m, NhwcDenseConv2d)}


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_predicted_moves_depthwise_layers_fuses_their_activation_and_stays_exact(tmp_path, keep):
    model = mobilenet_v2_cifar().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(keep_ratio=keep, channels_last=True))
    moved = _dense_nhwc(c)
    depthwise = [m for m in moved.values() if m.groups > 1]
    assert depthwise and all(m.act == "relu6" for m in depthwise)  # ReLU6 fused by fuse_epilogues
    nodes = {n.target: n for n in c.graph_module.graph.nodes if n.op == "call_module"}
    assert all(records(nodes[n]).kernel.strategy == "nhwc" for n in moved)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = c(x)
        if keep == 1.0:
            assert rel_err(got, model(x)) <= 1e-5
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    reloaded = {n: (m.out_hw, m.act) for n, m in _dense_nhwc(loaded).items()}
    assert {n: reloaded.get(n) for n in moved} == {n: (m.out_hw, m.act) for n, m in moved.items()}
    with torch.no_grad():
        assert rel_err(loaded(x), got) <= 1e-6


def test_nchw_models_keep_onednn():
    c = ispc.compile(mobilenet_v2_cifar().eval(), _data(), progress=False,
                     config=ispc.GatingConfig(channels_last=False))
    assert not _dense_nhwc(c)


@pytest.mark.parametrize("faster", ["nhwc", "onednn"])
def test_measured_keeps_the_faster_kernel_with_its_times(monkeypatch, faster):
    def fake(fns, rounds, **kw):
        if set(fns) == {"onednn", "nhwc"}:
            return {k: 1.0 if k == faster else 2.0 for k in fns}
        return {k: 2.0 if k.startswith("dense") else 1.0 for k in fns}  # every gate pays

    monkeypatch.setattr(kernel_costs, "time_candidates", fake)
    cfg = ispc.GatingConfig(latency_aware=True, latency_rounds=1, channels_last=True)
    c = ispc.compile(resnet20().eval(), _data(), progress=False, config=cfg)
    moved = _dense_nhwc(c)
    kernels = [records(n).kernel for n in c.graph_module.graph.nodes
               if records(n).kernel is not None and records(n).kernel.strategy in ("nhwc", "onednn")
               and not hasattr(c.graph_module.get_submodule(n.target), "scale")]
    assert kernels and all(k.strategy == faster and k.cost_model == "measured"
                           and set(k.times_ms) == {"onednn", "nhwc"} for k in kernels)
    assert bool(moved) == (faster == "nhwc")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
    assert torch.isfinite(out).all()


def test_measured_moves_onednn_layers_where_the_whole_model_is_faster_native(monkeypatch):
    """oneDNN faster for each layer alone, but the whole model (as the runner runs it) faster
    with every layer native: they all move, recorded as chosen by the whole-model timing."""
    seen = []

    def fake(fns, rounds, **kw):
        if set(fns) == {"onednn", "nhwc"}:
            return {"onednn": 1.0, "nhwc": 2.0}
        if set(fns) == {"per_layer", "native"}:
            for fn in fns.values():
                fn()  # each way runs
            seen.append(sorted(fns))
            return {"per_layer": 2.0, "native": 1.0}
        return {k: 2.0 if k.startswith("dense") else 1.0 for k in fns}

    monkeypatch.setattr(kernel_costs, "time_candidates", fake)
    cfg = ispc.GatingConfig(latency_aware=True, latency_rounds=1, channels_last=True)
    model = mobilenet_v2_cifar().eval()
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    assert seen == [["native", "per_layer"]]
    moved = _dense_nhwc(c)
    assert any(m.groups > 1 for m in moved.values())
    nodes = {n.target: n for n in c.graph_module.graph.nodes if n.op == "call_module"}
    assert all(records(nodes[n]).kernel.cost_model == "measured_whole_model" for n in moved)
    assert any("whole model was faster" in n for n in c.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(c(x)).all()
        assert rel_err(c(x), c.graph_module(x)) <= 1e-6


def test_gated_layers_keeping_every_channel_reload_on_the_dense_kernel(tmp_path):
    # such a layer is exported as its dense convolution; ispc.load must not leave it on oneDNN
    model = resnet20().eval()
    c = ispc.compile(model, _data(), progress=False,
                     config=ispc.GatingConfig(keep_ratio=1.0, mode="topk", channels_last=True))
    nhwc = {n for n, m in c.gated_modules().items() if m.strategy == "nhwc" and m.keeps_all}
    assert nhwc
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    assert nhwc <= set(_dense_nhwc(loaded))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) <= 1e-5


def test_onednn_is_timed_with_the_activation_the_native_kernel_would_fuse():
    from ispc.passes.dense_kernels import _activation_after

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + x

    gm = torch.fx.symbolic_trace(Block())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert _activation_after(gm, nodes["a"]) is torch.relu_
    assert _activation_after(gm, nodes["b"]) is None  # an add: not timed with it
