"""find_sites: channel kinds, candidate layers and reasons for the others."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ispc.config import GatingConfig
from ispc.passes import PassState, capture, coupling_groups, find_sites, records


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grp = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.refl = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(48, 16, 1)
        self.w = nn.Parameter(torch.randn(8, 16, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.a(x)) + x
        z = self.refl(self.grp(self.dw(y)))
        c = torch.cat([z, y], 1)
        h = F.conv2d(self.b(c), self.w)
        return self.fc(h.mean((2, 3)))


def _layers(cfg=GatingConfig()):
    x = torch.randn(2, 3, 8, 8)
    state = PassState(config=cfg, example_inputs=(x,))
    gm = find_sites(capture(Net(), state), state)
    layers = {records(n).layer.name: records(n).layer for n in gm.graph.nodes
              if records(n).layer is not None}
    return gm, state, layers


def test_reasons_and_candidates():
    _, _, layers = _layers()
    assert layers["a"].candidate and layers["b"].candidate
    assert "too few input channels" in layers["stem"].reason
    assert layers["dw"].reason == "depthwise conv"
    assert layers["grp"].reason == "grouped conv (groups=4)"
    assert "padding_mode='reflect'" in layers["refl"].reason
    assert "functional" in layers["conv2d"].reason
    assert "linear" in layers["fc"].reason
    assert layers["a"].macs == 16 * 8 * 8 * 16 * 9
    assert layers["conv2d"].macs == 8 * 8 * 8 * 16


def test_include_exclude_patterns():
    _, _, layers = _layers(GatingConfig(exclude=("a",)))
    assert layers["a"].reason == "excluded by config.exclude"
    _, _, layers = _layers(GatingConfig(include=("b*",)))
    assert layers["a"].reason == "not matched by config.include" and layers["b"].candidate


def test_channel_graph_and_couplings():
    gm, state, layers = _layers()
    g = state.channel_graph
    kinds = {n: d["kind"] for n, d in g.nodes(data=True)}
    assert kinds["add"] == "couple" and kinds["cat"] == "concat" and kinds["dw"] == "depthwise"
    # the residual add ties stem's output channels to a's output channels
    groups = coupling_groups(g)
    grp = next(gr for gr in groups if "stem" in gr)
    assert "a" in grp and "add" in grp
    assert "residual" in layers["dw"].site


def test_linear_sites_and_macs_per_instance():
    """A linear layer over tokens is a candidate; one over windows (N * windows rows) is not, and
    its MACs count every window of an instance."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(16, 32)
            self.win = nn.Linear(16, 16)

        def forward(self, x):  # x: N x 8 x 16 tokens
            y = self.mlp(x).sum()
            w = self.win(x.reshape(-1, 4, 16))  # 2 windows of 4 tokens per instance
            return y + w.sum()

    x = torch.randn(3, 8, 16)
    state = PassState(config=GatingConfig(), example_inputs=(x,))
    gm = find_sites(capture(Tokens(), state), state)
    layers = {records(n).layer.name: records(n).layer for n in gm.graph.nodes
              if records(n).layer is not None}
    assert layers["mlp"].candidate and layers["mlp"].macs == 8 * 16 * 32
    assert "6 rows for a batch of 3" in layers["win"].reason
    assert layers["win"].macs == 8 * 16 * 16
