"""The channels_last pass: layout converters at the graph's edges, the same values either way."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err
from ispc.examples.models import create_model
from ispc.modules import GatedConv2d, ToMemoryFormat
from ispc.ops import native
from ispc.passes import layout_converters
from ispc.passes.channels_last import runs_channels_last

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: "
                                  f"{native.unavailable_reason()}")


def _data(n=2, size=32, batch=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _compile(model, layout, **kw):
    cfg = ispc.GatingConfig(mode="topk", keep_ratio=0.5, channels_last=layout, **kw)
    return ispc.compile(model, _data(), config=cfg, progress=False)


@needs_native
@pytest.mark.parametrize("name", ["vgg16_cifar", "resnet20", "mobilenet_v2_cifar"])
def test_channels_last_gives_the_nchw_results_and_keeps_the_layout_inside(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    nchw, nhwc = _compile(model, False), _compile(model, True)
    assert not layout_converters(nchw.graph_module)
    assert runs_channels_last(nhwc.graph_module)
    assert nhwc.report.summary["channels_last"] and not nchw.report.summary["channels_last"]
    assert "channels-last (NHWC)" in str(nhwc.report)
    for m in nhwc.gated_modules().values():  # the oneDNN gather path: the one layout-sensitive kernel
        m.set_strategy("gather")
    for m in nchw.gated_modules().values():
        m.set_strategy("gather")
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(native.is_channels_last(a[0])))
             for m in nhwc.gated_modules().values()]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, want = nhwc(x), nchw(x)
    for h in hooks:
        h.remove()
    assert seen and all(seen)  # every gated layer read a channels-last map
    assert out.shape == want.shape and out.is_contiguous()
    assert rel_err(out, want) <= 1e-5
    assert rel_err(out, model(x)) < 1.0  # a gated model, not garbage


def test_map_outputs_come_back_contiguous():
    body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    c = _compile(body.eval(), True, min_channels=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
    assert out.is_contiguous() and out.shape == (2, 32, 32, 32)
    assert runs_channels_last(c.graph_module)


class _Viewed(nn.Module):
    """A ``.view`` of a map: only valid on NCHW memory (channels-last raises)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 32 * 32, 10)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.fc(y.view(y.shape[0], -1))


class _ReadsNCHWMemory(_Viewed):
    """Reads its map's memory as NCHW whatever the strides (as a C extension might): channels-last
    would give a silently wrong answer."""

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        y = self.b(y.as_strided((n, c, h, w), (c * h * w, h * w, w, 1)))
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("model_cls, note", [(_Viewed, "does not run channels-last"),
                                             (_ReadsNCHWMemory, "outputs differ from NCHW's")])
def test_a_model_that_cannot_run_channels_last_keeps_nchw_with_a_note(model_cls, note):
    model = model_cls().eval()
    c = _compile(model, True, min_channels=8)
    assert not layout_converters(c.graph_module)
    assert any(note in n for n in c.report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = c(x)
        assert out.shape == (2, 10)
        assert rel_err(out, _compile(model, False, min_channels=8)(x)) <= 1e-5


def test_layout_is_off_unless_asked_or_measured():
    model = create_model("resnet20").eval()
    assert not layout_converters(_compile(model, None).graph_module)  # not latency-aware: off
    with pytest.raises(ispc.ConfigError, match="channels_last"):
        ispc.GatingConfig(channels_last="yes")


def test_converters_are_the_identity_outside_plain_eager_calls():
    to_cl = ToMemoryFormat(True)
    x = torch.randn(2, 4, 5, 5)
    assert native.is_channels_last(to_cl(x)) and torch.equal(to_cl(x), x)  # native for an image
    for y in (torch.randn(2, 20, 5, 5), x.double(), x.requires_grad_(False).clone().requires_grad_()):
        out = to_cl(y)  # many channels, another dtype, autograd: PyTorch's copy
        assert native.is_channels_last(out) and torch.equal(out.detach(), y.detach())
    cl = to_cl(x)
    assert to_cl(cl) is cl  # already channels-last
    assert to_cl(x[0]) is not None and to_cl(x[0]).is_contiguous()  # 3-d: untouched
    traced = torch.fx.symbolic_trace(to_cl)  # traced: the identity
    assert [n.op for n in traced.graph.nodes] == ["placeholder", "output"]
    to_cl.enabled = False
    assert to_cl(x) is x


@needs_native
def test_save_load_and_export_keep_the_values(tmp_path):
    torch.manual_seed(0)
    model = create_model("vgg16_cifar").eval()
    c = _compile(model, True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = c(x)
    path = ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(path)
    assert runs_channels_last(loaded.graph_module)  # the layout is part of the archive
    assert any(isinstance(m, GatedConv2d) for m in loaded.graph_module.modules())
    with torch.no_grad():
        assert rel_err(loaded(x), want) <= 1e-5
    ep = ispc.export.export_program(c, x)  # the converters export as nothing
    assert not any("contiguous" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        assert rel_err(ep.module()(x), want) <= 1e-5
