"""fuse_epilogues: residual adds and activations after gated layers move into the layers, exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import ispc
from conftest import features_only, gated_layer_errors, rel_err
from ispc.examples.models import mobilenet_v2, resnet20
from ispc.ops import native
from ispc.passes.fuse_epilogues import activation_of


class Blocks(nn.Module):
    """Every pattern the pass must fuse, and the ones it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.c = nn.ModuleList(nn.Conv2d(24, 24, 3, padding=1) for _ in range(7))
        self.act = nn.ReLU(inplace=True)
        self.act6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        c = self.c
        y = self.act(c[0](x))               # conv -> ReLU module (in place)
        y = c[1](y)
        y += x                               # conv += residual (in place into the conv output)
        y = F.relu(y)                        # ... -> relu: one fused layer
        z = self.act6(torch.add(x, c[2](y)))  # residual + conv -> ReLU6
        w = c[3](z) + z                      # conv + residual, no activation
        keep = c[4](w)                       # two readers of the conv output: not fused
        v = torch.relu(keep) + keep
        u = torch.add(c[5](v), v, alpha=2.0)  # add with alpha: not fused
        t = v.clone()
        t += c[6](u)  # traced by torch.fx as t = t + conv (no mutation left): fused
        return t.relu() + t


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(n)]


def _compile(model, fuse, **kw):
    cfg = ispc.GatingConfig(keep_ratio=kw.pop("keep_ratio", 0.5), mode="topk", fuse_epilogues=fuse,
                            min_channels=8, **kw)
    return ispc.compile(model, _data(), config=cfg, progress=False)


def test_fuses_exactly_the_safe_patterns():
    import copy

    model = Blocks().eval()
    before = copy.deepcopy(model)
    fused = _compile(model, True)
    mods = fused.gated_modules()
    epi = {name: (m.residual_add, m.act) for name, m in mods.items()}
    assert epi["c.0"] == (False, "relu")
    assert epi["c.1"] == (True, "relu")
    assert epi["c.2"] == (True, "relu6")
    assert epi["c.3"] == (True, None)
    assert epi["c.6"] == (True, None)
    for name in ("c.4", "c.5"):
        assert epi[name] == (False, None), name
    assert any("fuse_epilogues" in n for n in fused.report.notes)
    plain = _compile(model, False)
    assert all(not m.residual_add and m.act is None for m in plain.gated_modules().values())
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        a, b = fused(x), plain(x)
    assert torch.equal(a, b)  # same ops, same order: bit for bit
    with torch.no_grad():
        assert torch.equal(model(x), before(x))  # the user's model is untouched


def test_in_place_add_into_the_residual_is_not_fused():
    import operator

    from torch import fx

    from ispc.passes.fuse_epilogues import residual_of

    g = fx.Graph()
    conv, other = g.placeholder("conv"), g.placeholder("other")
    into_conv = g.call_function(operator.iadd, (conv, other))
    into_other = g.call_function(operator.iadd, (other, conv))
    assert residual_of(into_conv, conv) is other
    assert residual_of(into_other, conv) is None  # other's readers would lose the update


@pytest.mark.parametrize("ctor", [resnet20, mobilenet_v2])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_fused_models_equal_unfused_and_reference(ctor, mode):
    torch.manual_seed(0)
    model = ctor().eval()
    data = [torch.randn(4, 3, 32, 32)]
    fused, plain = (ispc.compile(model, data, progress=False,
                                 config=ispc.GatingConfig(keep_ratio=0.5, mode=mode, fuse_epilogues=f))
                    for f in (True, False))
    n_fused = sum(m.residual_add or m.act is not None for m in fused.gated_modules().values())
    assert n_fused >= len(fused.gated_modules()) // 2
    features_only(fused), features_only(plain)  # the convolutions compared bit for bit
    x = torch.randn(3, 3, 32, 32)
    errs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: errs.append(rel_err(o, mod.reference(*a))))
             for m in fused.gated_modules().values()]
    with torch.no_grad():
        a = fused(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.equal(a, plain(x))
    assert max(errs) <= 1e-5
    # autograd and the dispatcher path run the epilogue as PyTorch ops
    xg = x.clone().requires_grad_(True)
    out = fused(xg)
    out.sum().backward()
    assert rel_err(out.detach(), a) <= 1e-5 and xg.grad is not None


def test_keep_all_fused_model_equals_the_original():
    torch.manual_seed(0)
    model = resnet20().eval()
    fused = ispc.compile(model, [torch.randn(4, 3, 32, 32)], progress=False,
                         config=ispc.GatingConfig(keep_ratio=1.0, mode="topk"))
    # layers that keep every channel are the dense conv: their add and ReLU stay graph nodes
    assert not any(m.residual_add or m.act for m in fused.gated_modules().values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_fused_native_layers_read_a_mismatched_residual_through_pytorch():
    """A broadcasting residual (not the output's shape) is added by PyTorch, not the kernel."""
    from ispc.modules import GatedConv2d

    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    m = GatedConv2d(w, b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), mode="topk",
                    threshold=0.0, k=8)
    m.set_strategy("native")
    m.residual_add, m.act = True, "relu"
    x, r = torch.randn(2, 16, 6, 6), torch.randn(1, 16, 1, 1)
    with torch.no_grad():
        assert rel_err(m(x, r), m.reference(x, r)) <= 1e-5
        assert rel_err(m(x, r.expand(2, 16, 6, 6)), m.reference(x, r)) <= 1e-5  # non-contiguous


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_a_residual_that_needs_gradients_keeps_them():
    """The kernel cannot backpropagate into the residual: such a residual is added by PyTorch."""
    from ispc.modules import GatedConv2d

    m = GatedConv2d(torch.randn(16, 16, 3, 3), torch.randn(16), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), mode="topk", threshold=0.0, k=8)
    m.requires_grad_(False)
    m.set_strategy("native")
    m.residual_add, m.act = True, "relu"
    x = torch.randn(2, 16, 6, 6)
    r = torch.randn(2, 16, 6, 6, requires_grad=True)
    out = m(x, r)
    out.sum().backward()
    assert r.grad is not None and torch.equal(r.grad, (out > 0).float())



def test_large_outputs_run_the_epilogue_after_the_kernel(monkeypatch):
    """Above EPILOGUE_MAX_BYTES (batch 32) the fused layers add and clamp in a pass after the
    kernel: the same values, bit for bit, as in the kernel and as unfused."""
    import ispc.modules as modules

    model = Blocks().eval()
    fused, plain = _compile(model, True), _compile(model, False)
    x = torch.randn(5, 3, 12, 12)
    calls = []
    if native.available():
        real = native.NativeLayer.gated

        def spy(self, *a, **k):  # records whether the kernel got a residual (args: x, ..., residual)
            calls.append(len(a) > 6 and a[6] is not None)
            return real(self, *a, **k)

        monkeypatch.setattr(native.NativeLayer, "gated", spy)
    with torch.no_grad():
        small = fused(x)
        monkeypatch.setattr(modules, "EPILOGUE_MAX_BYTES", 0)
        n_small = len(calls)
        large = fused(x)
        assert torch.equal(small, large) and torch.equal(large, plain(x))
    if native.available():
        assert any(calls[:n_small]) and not any(calls[n_small:])  # residuals went to the kernel first


class Pools(nn.Module):
    """conv -> ReLU -> 2x2 pool three times: a dense stem (its ReLU a graph node), a gated layer
    (its ReLU fused into it first), and a ReLU whose input has a second reader (stays put)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 24, 3, padding=1)
        self.pool = nn.ModuleList(nn.MaxPool2d(2) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool[0](F.relu(self.stem(x)))
        x = self.pool[1](torch.relu(self.c1(x)))
        y = self.c2(x)
        return self.pool[2](F.relu(y)).sum((2, 3)) + y.mean((2, 3))


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_activations_move_into_the_max_pool_after_them(mode, tmp_path):
    from ispc.modules import StridedMaxPool2d

    torch.manual_seed(0)
    model = Pools().eval()
    fused, plain = (ispc.compile(model, _data(), progress=False, config=ispc.GatingConfig(
        keep_ratio=0.5, mode=mode, fuse_epilogues=f, min_channels=8)) for f in (True, False))
    pools = {n: m.act for n, m in fused.graph_module.named_modules() if isinstance(m, StridedMaxPool2d)}
    assert pools == {"pool.0": "relu", "pool.1": "relu", "pool.2": None}
    assert fused.gated_modules()["c1"].act is None  # its ReLU went on into the pool
    assert any(n.startswith("moved 2 activation") for n in fused.report.notes)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
    xg = x.clone().requires_grad_()  # the autograd path applies the moved activations too
    assert rel_err(fused(xg).detach(), plain(x)) <= 1e-6
    # saved graphs hold act(pool(y)) as ATen ops: ispc.load moves the activations in again
    path = tmp_path / "pools.ispc"
    ispc.save(fused, path)
    loaded = ispc.load(path)
    assert sorted(m.act or "" for m in loaded.graph_module.modules()
                  if isinstance(m, StridedMaxPool2d)) == ["", "relu", "relu"]
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    whole = ispc.compile(model, _data(), progress=False, config=ispc.GatingConfig(
        keep_ratio=1.0, mode=mode, min_channels=8))  # every channel kept: the ReLUs are graph nodes
    assert sum(m.act is not None for m in whole.graph_module.modules()
               if isinstance(m, StridedMaxPool2d)) == 2
    with torch.no_grad():
        assert rel_err(whole(x), model(x)) <= 1e-5


class LinearGelu(nn.Module):
    """ConvNeXt's pointwise pair on an NHWC map (``fc1 -> GELU -> fc2``) and the GELUs the pass
    must leave alone: after a convolution, the tanh approximation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(24, 24, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(24, 48), nn.Linear(48, 24), nn.Linear(24, 24)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv(x))
        x = F.gelu(self.conv2(x))                           # a convolution's GELU: not fused
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(y)))                 # nn.GELU after fc1: fused
        y = F.gelu(self.fc3(y), approximate="tanh")         # tanh approximation: not fused
        return y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_gelu_fuses_into_gated_linear_layers_only(capture, tmp_path):
    torch.manual_seed(0)
    model = LinearGelu().eval()
    fused = _compile(model, True, capture=capture)
    plain = _compile(model, False, capture=capture)
    acts = {n.rsplit(".", 1)[-1]: m.act for n, m in fused.gated_modules().items()}
    assert acts.get("fc1") == "gelu" and acts.get("conv2") is None and acts.get("fc3") is None
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        a, b = fused(x), plain(x)
    assert rel_err(a, b) <= 1e-5
    errs = gated_layer_errors(fused, x)
    assert errs and max(errs.values()) <= 1e-5
    # the archive holds the GELU as an ATen node after the gated op: ispc.load fuses it again
    loaded = ispc.load(ispc.save(fused, tmp_path / "m.ispc"))
    assert {n.rsplit(".", 1)[-1]: m.act for n, m in loaded.gated_modules().items()}.get("fc1") == "gelu"
    with torch.no_grad():
        assert rel_err(loaded(x), a) <= 1e-5


class ScaledBlock(nn.Module):
    """A ConvNeXt block's end on an NHWC map: ``x + permute(gamma * fc2(...))`` (Hugging Face's
    order) or ``x + gamma * permute(fc2(...))`` (torchvision's and timm's)."""

    def __init__(self, hf_order: bool) -> None:
        super().__init__()
        self.hf_order = hf_order
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        shape = (16,) if hf_order else (16, 1, 1)
        self.gamma = nn.Parameter(torch.rand(shape) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        y = (self.gamma * y).permute(0, 3, 1, 2) if self.hf_order \
            else self.gamma * y.permute(0, 3, 1, 2)
        return x + y


@pytest.mark.parametrize("hf_order", [True, False])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_layer_scale_folds_and_the_residual_fuses_across_the_permute(hf_order, capture, tmp_path):
    torch.manual_seed(0)
    model = ScaledBlock(hf_order).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]
    cfg = dict(keep_ratio=0.5, mode="topk", min_channels=8, capture=capture)
    fused = ispc.compile(model, data, config=ispc.GatingConfig(**cfg), progress=False)
    plain = ispc.compile(model, data, config=ispc.GatingConfig(**cfg, fuse_epilogues=False),
                         progress=False)
    fc2 = {n.rsplit(".", 1)[-1]: m for n, m in fused.gated_modules().items()}["fc2"]
    assert fc2.residual_add and fc2.act is None
    # the layer scale is in fc2's weights: no multiplication by gamma is left in the graph
    assert not any(n.op == "get_attr" and "gamma" in str(n.target)
                   for n in fused.graph_module.graph.nodes)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # user's model
    x = torch.randn(3, 3, 12, 12, generator=g)
    with torch.no_grad():
        a, b = fused(x), plain(x)
    assert rel_err(a, b) <= 1e-5 and rel_err(a, model(x)) < 1
    errs = gated_layer_errors(fused, x)
    assert errs.keys() == fused.gated_modules().keys() and max(errs.values()) <= 1e-5
    loaded = ispc.load(ispc.save(fused, tmp_path / "m.ispc"))
    with torch.no_grad():
        assert rel_err(loaded(x), a) <= 1e-5
    # at keep 1.0 nothing is fused, and the model equals the original
    full = ispc.compile(model, data, config=ispc.GatingConfig(**{**cfg, "keep_ratio": 1.0}),
                        progress=False)
    with torch.no_grad():
        assert rel_err(full(x), model(x)) <= 1e-5


def test_activation_of_reads_relu6_as_hardtanh_in_either_form():
    # torch.export writes nn.ReLU6(inplace=True) as aten.hardtanh_ (0, 6): the same epilogue
    g = fx.Graph()
    x = g.placeholder("x")
    for fn in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default):
        assert activation_of(None, g.call_function(fn, (x, 0.0, 6.0))) == "relu6"
        assert activation_of(None, g.call_function(fn, (x, -1.0, 1.0))) is None


@pytest.mark.skipif(not native.available(), reason="the native kernels need a C compiler")
def test_the_note_counts_dense_native_layers_apart_from_gated_ones():
    """A model with no layer gated but its dense layers on ispc's kernels, epilogues fused: the
    note said "after N gated layer(s)" with none gated."""
    cfg = ispc.GatingConfig(exclude=("*",), channels_last=True, dense_route="off")
    fast = ispc.compile(resnet20().eval(), _data(), config=cfg)
    assert fast.report.summary["layers_gated"] == 0
    note = next(n for n in fast.report.notes if n.startswith("fused the residual"))
    assert "gated" not in note.split(" into ")[0] and "dense native layer(s)" in note, note
