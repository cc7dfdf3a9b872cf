"""hand_sums: native layers hand their output's saliency sums to the gated layers reading it, and
those select exactly as from the map."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import ispc
from conftest import features_only, gated_layer_errors, rel_err
from ispc.examples.models import mobilenet_v2_cifar, resnet20
from ispc.modules import GatedConv2d, NhwcDenseConv2d, SaliencySums
from ispc.ops import native
from ispc.passes import PassState, hand_sums
from ispc.records import records
from zoo import TinyResNet

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(n)]


def _compile(model, sums, **kw):
    cfg = ispc.GatingConfig(keep_ratio=kw.pop("keep_ratio", 0.5), mode=kw.pop("mode", "topk"),
                            channels_last=True, hand_sums=sums, **kw)
    return ispc.compile(model, _data(), config=cfg, progress=False)


def _links(c) -> tuple[dict[str, SaliencySums], dict[str, SaliencySums]]:
    mods = dict(c.graph_module.named_modules())
    ins = {n: m.sums_in for n, m in mods.items() if isinstance(m, GatedConv2d) and m.sums_in}
    outs = {n: m.sums_out for n, m in mods.items()
            if isinstance(m, (GatedConv2d, NhwcDenseConv2d)) and m.sums_out}
    return ins, outs


@pytest.fixture
def taken(monkeypatch):
    """How many times a consumer was handed sums (True) or computed its own (False)."""
    seen: list[bool] = []
    get = SaliencySums.get

    def counting(self, x, kind):
        got = get(self, x, kind)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(SaliencySums, "get", counting)
    return seen


@pytest.mark.parametrize("factory,saliency,mode", [(mobilenet_v2_cifar, "l2", "topk"),
                                                   (resnet20, "l1", "topk"),
                                                   (TinyResNet, "l2", "threshold")])
def test_consumers_select_as_from_the_map(factory, saliency, mode, taken):
    model = factory().eval()
    on = _compile(model, True, saliency=saliency, mode=mode)
    off = _compile(model, False, saliency=saliency, mode=mode)
    ins, outs = _links(on)
    assert ins and outs and not any(_links(off))
    assert {id(v) for v in ins.values()} <= {id(v) for v in outs.values()}  # shared links
    kind = {"l2": 0, "l1": 1}[saliency]
    assert all(link.kind == kind for link in outs.values())
    nodes = {n.target: n for n in on.graph_module.graph.nodes if n.op == "call_module"}
    assert all(records(nodes[n]).sums.reads_from for n in ins)
    assert any("hand_sums" in note for note in on.report.notes)
    x = torch.randn(3, 3, 32, 32)
    features_only(on), features_only(off)  # compared bit for bit
    with torch.no_grad():  # layer by layer (the eager runner's one native call links the same)
        a, b = on.graph_module(x), off.graph_module(x)
        assert torch.equal(on(x), a) and torch.equal(off(x), b)
    assert taken.count(True) == len(ins) and not taken.count(False)  # every consumer used them
    assert torch.equal(a, b)  # the same selection: bit for bit
    errs = gated_layer_errors(on, x)
    assert errs and max(errs.values()) <= 1e-5, errs


def test_every_channel_kept_links_nothing_and_equals_the_model():
    model = resnet20().eval()
    c = _compile(model, True, keep_ratio=1.0)
    assert not any(_links(c))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-5


def test_saved_models_link_again(tmp_path, taken):
    model = mobilenet_v2_cifar().eval()
    c = _compile(model, True)
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    assert loaded.config.hand_sums
    assert set(_links(loaded)[0]) == set(_links(c)[0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))
    assert taken and all(taken)


class _Fork(nn.Module):
    """One map (a ReLU'd conv) read by two gated layers, and by whatever ``tail`` does to it."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.a = nn.Conv2d(24, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 1)
        self.c = nn.Conv2d(24, 24, 1)
        self.tail = tail

    def forward(self, x):
        y = torch.relu(self.a(torch.relu(self.stem(x))))
        p, q = self.b(y), self.c(y)
        if self.tail == "in place":
            y.mul_(2.0)
        return p + q + y


def _fork(tail: str):
    torch.manual_seed(0)
    return _compile(_Fork(tail).eval(), True, min_channels=8, gate_fraction=1.0)


def test_a_map_written_in_place_is_not_linked():
    mods = _fork("in place").graph_module
    assert mods.a.sums_out is None and mods.b.sums_in is None and mods.c.sums_in is None
    mods = _fork("read").graph_module
    assert mods.a.sums_out is not None and mods.b.sums_in is mods.c.sums_in is mods.a.sums_out


def test_readers_of_two_kinds_compute_their_own():
    c = _fork("read")
    gm = c.graph_module
    gm.c.saliency = "l1"
    state = PassState(config=c.config, progress=False)
    hand_sums(gm, state)
    assert gm.a.sums_out is None and gm.b.sums_in is None and gm.c.sums_in is None
    assert any("different saliency kinds" in n for n in state.notes)
    x = torch.randn(2, 3, 32, 32)
    errs = gated_layer_errors(c, x)
    assert max(errs.values()) <= 1e-5


def test_a_link_hands_sums_only_for_the_tensor_they_are_of():
    link = SaliencySums(1)
    out, other, sums = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    assert link.get(out, 1) is None
    link.put(out, sums)
    assert link.get(out, 1) is sums
    assert link.get(other, 1) is None and link.get(out, 0) is None  # another tensor or kind
    for twin in (copy.deepcopy(link), pickle.loads(pickle.dumps(link))):
        assert twin.kind == 1 and twin.get(out, 1) is None  # copies carry no stale output
    del out
    assert link.get(torch.randn(2, 4, 3, 3), 1) is None
