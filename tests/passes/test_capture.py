"""capture: tracing with shapes; untraceable models give a TraceError naming the construct."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from ispc.config import GatingConfig
from ispc.passes import PassState, capture


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: FX cannot trace it
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_shapes_recorded():
    x = torch.randn(2, 3, 8, 8)
    state = PassState(config=GatingConfig(), example_inputs=(x,))
    gm = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), state)
    shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    assert shapes == [(2, 4, 6, 6), (2, 4, 6, 6)]


def test_untraceable_names_submodule_and_fix():
    with pytest.raises(ispc.TraceError) as info:
        capture(Net(), PassState(config=GatingConfig()))
    msg = str(info.value)
    assert "'gate'" in msg and "DataDependent" in msg and "leaf_modules" in msg
    assert "x.sum() > 0" in msg


def test_leaf_module_makes_it_traceable():
    x = torch.randn(1, 3, 8, 8)
    cfg = GatingConfig(leaf_modules=(DataDependent,))
    gm = capture(Net(), PassState(config=cfg, example_inputs=(x,)))
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_wrong_input_shape_is_a_data_error():
    with pytest.raises(ispc.DataError, match="channels"):
        capture(nn.Conv2d(3, 4, 3), PassState(config=GatingConfig(),
                                              example_inputs=(torch.randn(1, 5, 8, 8),)))


class ChecksItsInput(nn.Module):
    """A Hugging Face-style forward: keyword arguments and a Python check on the input's shape,
    which torch.fx cannot trace and torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, pixel_values, return_dict=True):
        if pixel_values.shape[1] != 3:
            raise ValueError("expected 3 channels")
        y = self.fc(self.conv(pixel_values).mean((2, 3)))
        return {"logits": y} if return_dict else (y,)


def _capture(model, x, **cfg):
    state = PassState(config=GatingConfig(**cfg), example_inputs=(x,), progress=False)
    return capture(model, state), state


def test_auto_falls_back_to_export_and_says_why():
    gm, state = _capture(ChecksItsInput().eval(), torch.randn(2, 3, 8, 8))
    assert state.capture == "export (dynamic batch)"
    assert any("torch.fx cannot trace" in n for n in state.notes)
    out = gm(torch.randn(5, 3, 8, 8))  # any batch size
    assert out["logits"].shape == (5, 4)


def test_capture_fx_refuses_what_fx_cannot_trace_and_suggests_export():
    with pytest.raises(ispc.TraceError, match="capture='export'"):
        _capture(ChecksItsInput().eval(), torch.randn(2, 3, 8, 8), capture="fx")
    with pytest.raises(ispc.DataError, match="calibration_data"):
        capture(ChecksItsInput(), PassState(config=GatingConfig(capture="export")))


def test_plain_models_keep_fx():
    _, state = _capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(2, 3, 8, 8))
    assert state.capture == "fx"


def test_a_batch_the_model_cannot_take_is_one_line_on_no_stderr(capfd):
    from ispc.examples.models import resnet18

    model = resnet18(num_classes=10).eval()
    for capture_mode in ("auto", "fx", "export"):
        with pytest.raises(ispc.DataError) as info:
            ispc.compile(model, [torch.randn(2, 3, 32)], progress=False,
                         config=GatingConfig(capture=capture_mode))
        msg = str(info.value)
        assert "\n" not in msg
        assert "(2, 3, 32)" in msg and "N x 3 x H x W" in msg and "'conv1'" in msg
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_an_exported_program_or_its_module_compiles():
    model, x = ChecksItsInput().eval(), torch.randn(4, 3, 8, 8)
    ep = torch.export.export(model, (), {"pixel_values": x},
                             dynamic_shapes={"pixel_values": {0: torch.export.Dim("b")}})
    for given in (ep, ep.module()):
        c = ispc.compile(given, [x], config=GatingConfig(keep_ratio=0.5, mode="topk",
                                                         min_channels=1), progress=False)
        assert c.report.summary["capture"] == "exported program"
        assert "conv" in c.gated_modules() and c.report.layer("fc").op == "linear"
        with torch.no_grad():
            assert c(pixel_values=x)["logits"].shape == (4, 4)


def test_static_export_batch_is_said():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 1)

        def forward(self, x):
            y = self.conv(x)
            return y.reshape(4, -1)  # the batch size written into the model

    gm, state = _capture(FixedBatch().eval(), torch.randn(4, 3, 2, 2), capture="export")
    assert state.capture.startswith("export (static batch 4")
    assert any("batches of 4 only" in n for n in state.notes)


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.inner(x)


def test_a_leaf_that_hides_convolutions_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), Hidden())
    c = ispc.compile(model, [torch.randn(2, 3, 8, 8)], progress=False,
                     config=GatingConfig(leaf_modules=(Hidden,), capture="fx"))
    note = next(n for n in c.report.notes if "leaf_modules" in n)
    assert "'1' (Hidden) hides 1 convolution" in note and "1.inner.0" in note


def test_a_suggested_leaf_never_hides_a_layer_ispc_would_gate():
    class Branchy(nn.Module):  # untraceable and holding a convolution: no leaf is suggested
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    model = nn.Sequential(nn.Conv2d(3, 16, 1), Branchy())
    with pytest.raises(ispc.TraceError) as info:
        capture(model, PassState(config=GatingConfig(capture="fx")))
    assert "leaf_modules=(" not in str(info.value) and "capture='export'" in str(info.value)
    with pytest.raises(ispc.TraceError) as info:  # torch.export cannot follow it either
        ispc.compile(model, [torch.randn(2, 3, 4, 4)], progress=False)
    msg = str(info.value)
    assert "leaf_modules=(" not in msg and "holds 1 convolution" in msg and "\n" not in msg
    # where the suggestion is a leaf, it works (test_leaf_module_makes_it_traceable)
    with pytest.raises(ispc.TraceError, match=r"leaf_modules=\(DataDependent,\)"):
        capture(Net(), PassState(config=GatingConfig()))
