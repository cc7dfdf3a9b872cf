"""lift: layers held as function calls become calls of modules at the user's paths (exported ATen
graphs; subclassed convolutions and F.linear traced through by torch.fx), exactly."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ispc.config import GatingConfig
from ispc.passes import PassState, capture, find_sites, lift, records
from ispc.passes.capture import export_graph


class SubConv(nn.Conv2d):
    """A convolution subclass (as Hugging Face and timm define them): traced through by fx."""

    def forward(self, x):
        return F.relu(super().forward(x))


class TimmLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(SubConv(16, 16, 3, padding=1), nn.ReLU6())
        self.tied = nn.Conv2d(16, 16, 1)
        self.free = nn.Parameter(torch.randn(16, 16, 1, 1))  # a bare parameter, not a module's
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Linear(16, 32)
        self.head = TimmLinear(32, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.tied(self.tied(x))  # one module, two calls
        x = F.conv2d(x, self.free)
        t = self.mlp(self.norm(x.permute(0, 2, 3, 1)))
        return self.head(F.gelu(t).mean((1, 2)))


def _state(x, capture_mode="auto"):
    return PassState(config=GatingConfig(capture=capture_mode), example_inputs=(x,), progress=False)


def _names(gm, kind):
    return {n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)}


def test_exported_graph_is_lifted_to_the_model_modules():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    state = _state(x, "export")
    gm = lift(capture(model, state), state)
    assert state.capture == "export (dynamic batch)"
    assert _names(gm, nn.Conv2d) == {"stem.0", "block.0", "tied"}
    assert _names(gm, nn.BatchNorm2d) == {"stem.1"} and _names(gm, nn.LayerNorm) == {"norm"}
    assert _names(gm, nn.Linear) == {"mlp", "head"}
    assert _names(gm, nn.ReLU6) == {"block.1"} and "stem.2" in _names(gm, nn.ReLU)
    assert sum(n.target == "tied" for n in gm.graph.nodes) == 2
    # the parameters are the model's own tensors, by their full names
    assert gm.get_submodule("mlp").weight is model.mlp.weight
    assert gm.get_submodule("tied").weight is model.tied.weight
    # the bare parameter stays a function call, named by the module it ran in (the model)
    funcs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert len(funcs) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gm(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-6)


def test_fx_graph_lifts_subclassed_convolutions_and_functional_linears():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    state = _state(x, "fx")
    gm = capture(model, state)
    assert "block.0" not in _names(gm, nn.Conv2d)  # fx traced through the subclass
    gm = lift(gm, state)
    assert "block.0" in _names(gm, nn.Conv2d) and "head" in _names(gm, nn.Linear)
    assert type(gm.get_submodule("block.0")) is nn.Conv2d
    gm = find_sites(gm, state)
    layers = {records(n).layer.name: records(n).layer for n in gm.graph.nodes
              if records(n).layer is not None}
    assert layers["block.0"].candidate and layers["mlp"].candidate
    (func,) = [f for f in layers.values() if f.op == "conv2d (functional)"]
    assert "functional" in func.reason
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_functional_layers_left_as_calls_are_counted_and_named_by_their_module():
    class Std(nn.Module):  # weight computed in forward (weight standardization): not liftable
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 3, 3, 3))
            self.fc = nn.Parameter(torch.randn(10, 16))

        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            y = F.conv2d(x, w, padding=1).mean((2, 3))
            return F.linear(y, self.fc * 2)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = Std()

        def forward(self, x):
            return self.std(x)

    x = torch.randn(2, 3, 8, 8)
    for mode in ("fx", "export"):
        state = _state(x, mode)
        gm = find_sites(lift(capture(Outer().eval(), state), state), state)
        layers = {records(n).layer.name: records(n).layer for n in gm.graph.nodes
                  if records(n).layer is not None}
        assert set(layers) == {"std:conv2d", "std:linear"}, (mode, set(layers))
        assert layers["std:linear"].macs == 16 * 10
        assert layers["std:conv2d"].macs == 16 * 8 * 8 * 3 * 9
        assert all(not f.candidate for f in layers.values())


def test_export_graph_keeps_keyword_inputs_and_outputs():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, pixel_values, return_dict=True):
            y = self.conv(pixel_values)
            return {"logits": y} if return_dict else (y,)

    x = torch.randn(3, 3, 4, 4)
    gm, label = export_graph(Keyword().eval(), x, "pixel_values")
    assert label == "export (dynamic batch)"
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["pixel_values"]
    out = gm(pixel_values=x[:1])
    assert isinstance(out, dict) and out["logits"].shape == (1, 4, 4, 4)
    assert not any(n.target == "_guards_fn" for n in gm.graph.nodes)
