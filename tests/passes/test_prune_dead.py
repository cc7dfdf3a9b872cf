"""prune_dead: channels no calibration input keeps leave the gated layer and the layer computing them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ispc
from conftest import rel_err
from ispc.modules import GatedConv2d, full_channels
from ispc.passes.prune_dead import MIN_SAMPLES, producer_of

DEAD = [0, 3, 4, 9, 13]  # inner channels that ReLU zeroes for every input


class Block(nn.Module):
    """stem -> a -> ReLU -> b (+ stem: residual) -> ReLU -> c (its input also feeds the output)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            for conv in (self.stem, self.a, self.b, self.c):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
            self.a.weight[DEAD] = 0.0
            self.a.bias[DEAD] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        y = F.relu(self.b(F.relu(self.a(s))) + s)   # a's output is read by b only
        z = self.c(y) + y                           # y is read by c and the add: c's producer is shared
        return self.head(z.mean((2, 3)))


def _data(n=160, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n // batch)]


def _compile(model, data=None, **kw):
    cfg = ispc.GatingConfig(**{"keep_ratio": 0.5, "min_channels": 8, **kw})
    return ispc.compile(model, data if data is not None else _data(), config=cfg, progress=False)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_dead_channels_leave_the_gated_layer_and_its_producer(mode):
    model = Block().eval()
    data = _data()
    pruned, plain = _compile(model, data, mode=mode), _compile(model, data, mode=mode, prune_dead=False)
    gm = pruned.graph_module
    b = gm.get_submodule("b")
    assert isinstance(b, GatedConv2d) and b.in_index is not None
    assert not set(DEAD) & set(b.in_index.tolist())  # every dead channel is gone ...
    a = gm.get_submodule("a")
    assert a.out_channels == b.in_channels < 16     # ... from b's input and a's output alike
    assert full_channels(a) == (16, 16) and full_channels(b) == (16, 16)
    assert b.k <= b.in_channels
    # c's input is also read by the residual add: its producer keeps every channel
    assert gm.get_submodule("b").out_channels == 16
    rows = {r.name: r for r in pruned.report.layers}
    assert rows["a"].out_pruned == rows["b"].in_pruned == 16 - b.in_channels
    assert any("prune_dead" in n for n in pruned.report.notes)
    with torch.no_grad():  # on the calibration inputs nothing pruned was ever kept: same outputs
        for x in data:
            assert rel_err(pruned(x), plain(x)) <= 1e-5
    mp, mq = pruned.measure(data), plain.measure(data)
    assert mp["dense_macs"] == pytest.approx(mq["dense_macs"])
    assert mp["mac_reduction"] > mq["mac_reduction"] + 0.02
    assert pruned.report.summary["mac_reduction"] > plain.report.summary["mac_reduction"]


def test_producer_search_stops_at_shared_or_parametrized_ops():
    c = _compile(Block().eval(), prune_dead=False)
    gm = c.graph_module
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert producer_of(gm, nodes["b"]).target == "a"
    assert producer_of(gm, nodes["c"]) is None   # y feeds c and the residual add
    assert producer_of(gm, nodes["a"]) is None   # s feeds a and the residual add


def test_nothing_is_pruned_when_every_channel_is_kept_or_data_is_scarce():
    model = Block().eval()
    x = torch.randn(6, 3, 8, 8)
    full = _compile(model, keep_ratio=1.0)
    with torch.no_grad():
        assert rel_err(full(x), model(x)) <= 1e-5
    assert all(m.in_index is None for m in full.gated_modules().values())
    few = _compile(model, [torch.randn(MIN_SAMPLES - 1, 3, 8, 8)])
    assert all(m.in_index is None for m in few.gated_modules().values())
    assert any("too few to call a channel dead" in n for n in few.report.notes)


def test_gate_masks_export_and_save_load_follow_the_pruned_layers(tmp_path):
    model = Block().eval()
    data = _data()
    c = _compile(model, data)
    x = data[0]
    with torch.no_grad():
        expect = c(x)
    with ispc.GateMasks(model, c), torch.no_grad():
        assert rel_err(model(x), expect) <= 1e-5
    ep = ispc.export_program(c, (x,))
    with torch.no_grad():
        assert rel_err(ep.module()(x), expect) <= 1e-5
    ispc.save(c, tmp_path / "m.ispc")
    with torch.no_grad():
        assert rel_err(ispc.load(tmp_path / "m.ispc")(x), expect) <= 1e-5
