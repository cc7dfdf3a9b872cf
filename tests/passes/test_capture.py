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
