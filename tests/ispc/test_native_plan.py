"""The eager backend's NativePlanRunner: a compiled model's channels-last layers in one native call
return exactly what the per-layer graph returns (the classifier, where the program runs it too,
within float rounding), and every call it cannot serve runs the graph."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import ispc
from conftest import features_only
from ispc import native_plan
from ispc.native_plan import NativePlanRunner
from ispc.examples.models import mobilenet_v2_cifar, resnet20
from ispc.modules import GatedConv2d
from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(n)]


def _compile(model, **kw):
    cfg = ispc.GatingConfig(keep_ratio=kw.pop("keep_ratio", 0.5), mode=kw.pop("mode", "topk"),
                            channels_last=True, **kw)
    return ispc.compile(model, _data(), config=cfg, progress=False)


def _runner(c) -> NativePlanRunner:
    r = c.__dict__["_runner"]
    assert isinstance(r, NativePlanRunner)
    return r


def _served(c, x: torch.Tensor) -> bool:
    """Whether the program ran for ``c(x)`` (its plans are built again for the call)."""
    programs = _runner(c)._programs
    for p in programs:
        p._plans.clear()
    with torch.no_grad():
        c(x)
    return any(plan is not None for p in programs for _, plan in p._plans.values())


def _matches(c, x: torch.Tensor) -> None:
    """``c(x)``, with the classifier in the program, within float rounding of the graph's; the
    features program alone bit for bit."""
    with torch.no_grad():
        want = c.graph_module(x)
        assert torch.equal(NativePlanRunner(c.graph_module, classifier=False)(x), want)
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return features_only(_compile(mobilenet_v2_cifar(num_classes=10).eval()))


@pytest.mark.parametrize("fuse_bytes", [0, 1 << 40])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 40, 24), (1, 3, 8, 8)])
def test_runner_equals_the_per_layer_graph(mobilenet, shape, fuse_bytes, monkeypatch):
    monkeypatch.setattr(native_plan, "FUSE_BYTES", fuse_bytes)  # every expansion fused, or none
    r = _runner(mobilenet)
    r._programs[0]._plans.clear()
    # the whole feature extractor is one program (its classifier left out here)
    assert len(r._programs) == 1 and len(r._programs[0]._seg) > 40
    x = torch.randn(shape)
    with torch.no_grad():
        want = mobilenet.graph_module(x)
        for _ in range(2):  # the second call reuses the plan and its buffers
            assert torch.equal(mobilenet(x), want)
    assert _served(mobilenet, x)
    (_, plan), = r._programs[0]._plans.values()
    fused = sum(op.kind == native._OP_EXPAND_DW for op in plan.program._ops)
    assert fused >= 10 if fuse_bytes == 0 else fused == 0  # each block's expansion and depthwise


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 40, 24)])
def test_expansions_split_by_channels_equal_the_per_layer_graph(mobilenet, shape, monkeypatch):
    """Expansions on maps of at most FUSE_CH_POSITIONS positions that FUSE_BYTES leaves unfused
    fuse with their depthwise layer split by channels: every block's here."""
    monkeypatch.setattr(native_plan, "FUSE_BYTES", 1 << 40)
    monkeypatch.setattr(native_plan, "FUSE_CH_POSITIONS", 1 << 40)
    r = _runner(mobilenet)
    r._programs[0]._plans.clear()
    x = torch.randn(shape)
    with torch.no_grad():
        want = mobilenet.graph_module(x)
        for _ in range(2):
            assert torch.equal(mobilenet(x), want)
    (_, plan), = r._programs[0]._plans.values()
    kinds = [op.kind for op in plan.program._ops]
    assert kinds.count(native._OP_EXPAND_DW_CH) >= 10 and native._OP_EXPAND_DW not in kinds
    r._programs[0]._plans.clear()


@pytest.mark.parametrize("budget", [1, 100_000])
def test_chunked_runs_equal_the_per_layer_graph_chunk_by_chunk(mobilenet, monkeypatch, budget):
    """A batch whose maps exceed the chunk budget runs chunk by chunk (the maps between the ops
    of a run in chunk-sized buffers): each chunk as the per-layer layers on those instances."""
    monkeypatch.setenv("ISPC_CHUNK_BYTES", str(budget))
    prog = _runner(mobilenet)._programs[0]
    seen, image = [], torch.randn(5, 3, 32, 32)
    hook = prog.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone(
        memory_format=torch.preserve_format)))
    try:
        with torch.no_grad():
            mobilenet(image)
    finally:
        hook.remove()
    x, = seen  # the program's input
    prog._plans.clear()
    with torch.no_grad():
        got = prog(x)
        assert torch.equal(prog(x), got)  # the plan's buffers reused
        (_, plan), = prog._plans.values()
        chunks = plan.program.chunks()
        assert any(0 < c < 5 for c in chunks) and chunks == sorted(chunks, key=lambda m: m or 5)
        if budget == 1:  # one instance at a time throughout: the layers on each alone
            assert set(chunks) == {1}
            want = torch.cat([prog._layers(x[i:i + 1]) for i in range(5)])
            assert torch.equal(got, want)
        # against the whole batch at once: the same up to the sums' rounding (the selection
        # reads saliency sums added in another order)
        ref = prog._layers(x)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.allclose(mobilenet(image), mobilenet.graph_module(image), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_runner_on_residual_networks_and_threshold_gates(mode):
    torch.manual_seed(1)
    c = _compile(resnet20(num_classes=10).eval(), mode=mode)
    x = torch.randn(2, 3, 32, 32)
    _matches(c, x)
    assert _served(c, x)


def test_changed_gates_rebuild_the_plan(mobilenet):
    x = torch.randn(2, 3, 32, 32)
    gated = [m for m in mobilenet.graph_module.modules() if isinstance(m, GatedConv2d)]
    layer, k = gated[3], gated[3].k
    try:
        with torch.no_grad():
            before = mobilenet(x)
            layer.k = 1
            after = mobilenet(x)
            assert torch.equal(after, mobilenet.graph_module(x))
            assert not torch.equal(after, before)
    finally:
        layer.k = k
    with torch.no_grad():
        assert torch.equal(mobilenet(x), before)


def test_calls_it_cannot_serve_run_the_graph(mobilenet):
    r = _runner(mobilenet)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = mobilenet.graph_module(x)
        # a channels-last input
        xl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(mobilenet(xl), want)
        # a hook on a layer inside the program: the per-layer path runs it
        seen = []
        gated = next(m for m in mobilenet.graph_module.modules() if isinstance(m, GatedConv2d))
        h = gated.register_forward_hook(lambda *a: seen.append(1))
        try:
            assert torch.equal(mobilenet(x), want) and seen == [1]
        finally:
            h.remove()
    # autograd: an input that needs gradients runs the per-layer path (PyTorch ops), and they reach it
    xg = x.clone().requires_grad_()
    out = mobilenet(xg)
    assert out.requires_grad
    assert (out - want).abs().max() < 1e-4
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # a plain call, grad mode on: the parameters are frozen, so the program runs as under no_grad
    assert torch.equal(mobilenet(x), want)


def test_copies_and_pickles_run_their_own_graph(mobilenet):
    x = torch.randn(1, 3, 32, 32)
    for c2 in (copy.deepcopy(mobilenet), pickle.loads(pickle.dumps(mobilenet))):
        r2 = _runner(c2)
        assert r2.gm is c2.graph_module
        with torch.no_grad():
            assert torch.equal(c2(x), mobilenet(x))


def test_saved_models_get_the_runner(mobilenet, tmp_path):
    path = tmp_path / "m.ispc"
    ispc.save(mobilenet, path)
    loaded = ispc.load(path)
    x = torch.randn(2, 3, 32, 32)
    _matches(loaded, x)
    assert _served(loaded, x)
    (_, plan), = _runner(loaded)._programs[0]._plans.values()  # the exported graph's classifier
    assert plan.program._ops[-1].kind == native._OP_LINEAR


def test_an_output_only_native_layers_read_is_kept_across_calls():
    # program 0 (a, b) writes a map that only layer c reads (with the input of a, as its
    # residual): its buffer is kept across calls; program 1 (d, e) hands its map to the caller:
    # a fresh tensor every call
    from torch import fx, nn

    from ispc.modules import NhwcDenseConv2d, ToMemoryFormat

    torch.manual_seed(0)
    conv = lambda: NhwcDenseConv2d(nn.Conv2d(8, 8, 3, padding=1))  # noqa: E731
    root = nn.Module()
    root.cl, root.a, root.b, root.c, root.d, root.e = ToMemoryFormat(True), *(conv() for _ in range(5))
    g = fx.Graph()
    t = g.call_module("cl", (g.placeholder("x"),))
    u = g.call_function(torch.relu, (t,))
    b = g.call_module("b", (g.call_module("a", (u,)),))
    e = g.call_module("e", (g.call_module("d", (g.call_module("c", (t, b)),)),))
    g.output(g.call_method("contiguous", (e,)))
    gm = fx.GraphModule(root, g)
    r = NativePlanRunner(gm)
    assert [[n.target for n in p._seg] for p in r._programs] == [["a", "b"], ["d", "e"]]
    assert [p.keep_output for p in r._programs] == [True, False]
    xs = [torch.randn(2, 8, 6, 5) for _ in range(2)]
    with torch.no_grad():
        wants = [gm(x) for x in xs]
        first = r(xs[0])
        second = r(xs[1])
        assert torch.equal(first, wants[0]) and torch.equal(second, wants[1])
        assert torch.equal(r(xs[0]), wants[0])
    kept = r._programs[0]._plans[(2, 8, 6, 5)][1].out
    assert kept is not None


@pytest.fixture(scope="module")
def with_classifier():
    torch.manual_seed(2)
    return _compile(mobilenet_v2_cifar(num_classes=10).eval())


def test_the_classifier_runs_in_the_program(with_classifier):
    """Pool, flatten, dropout and linear as the program's last op: within float rounding of the
    graph at every batch; changed classifier weights rebuild the plan."""
    c = with_classifier
    r = _runner(c)
    assert r.classifier and len(r._programs) == 1
    names = [n.target for n in r._programs[0]._seg]
    assert names[-2:] == ["classifier.0", "classifier.1"] and torch.flatten in names
    for shape in [(1, 3, 32, 32), (3, 3, 32, 24)]:
        _matches(c, torch.randn(shape))
    x = torch.randn(2, 3, 32, 32)
    assert _served(c, x)
    (_, plan), = r._programs[0]._plans.values()
    assert plan.program._ops[-1].kind == native._OP_LINEAR and plan.out_shape == (2, 10)
    lin = c.graph_module.get_submodule("classifier.1")
    with torch.no_grad():
        lin.weight.mul_(2.0)
        try:
            _matches(c, x)
        finally:
            lin.weight.div_(2.0)
        _matches(c, x)


def test_chunked_runs_with_the_classifier(with_classifier, monkeypatch):
    monkeypatch.setenv("ISPC_CHUNK_BYTES", "1")
    c = with_classifier
    _runner(c)._programs[0]._plans.clear()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got = c(x)
        want = torch.cat([c.graph_module(x[i:i + 1]) for i in range(5)])
    plan = next(p for _, p in _runner(c)._programs[0]._plans.values())
    assert set(plan.program.chunks()) == {1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_classifier_in_training_mode_runs_the_graph(with_classifier):
    c = with_classifier
    drop = c.graph_module.get_submodule("classifier.0")
    x = torch.randn(1, 3, 32, 32)
    drop.train()
    try:
        assert not _served(c, x)
    finally:
        drop.eval()
    assert _served(c, x)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_graph_that_is_one_program_is_called_directly(as_tuple):
    """The graph module's own Python is skipped where the graph is one program returning its
    value as it is; a tuple output keeps the graph."""
    from torch import fx, nn

    from ispc.modules import NhwcDenseConv2d, ToMemoryFormat

    torch.manual_seed(0)
    root = nn.Module()
    root.cl, root.a, root.b = ToMemoryFormat(True), *(NhwcDenseConv2d(nn.Conv2d(3, 3, 3, padding=1))
                                                      for _ in range(2))
    g = fx.Graph()
    out = g.call_module("b", (g.call_module("a", (g.call_module("cl", (g.placeholder("x"),)),)),))
    g.output((out,) if as_tuple else out)
    gm = fx.GraphModule(root, g)
    r = NativePlanRunner(gm)
    assert len(r._programs) == 1 and (r._direct is None) == as_tuple
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        got, want = r(x), gm(x)
    assert type(got) is type(want)
    assert torch.equal(got[0] if as_tuple else got, want[0] if as_tuple else want)
    assert _served(_Wrap(r), x)


class _Wrap:
    """A compiled model's stand-in for ``_served``: its runner, called."""

    def __init__(self, r):
        self.__dict__["_runner"] = r

    def __call__(self, x):
        return self.__dict__["_runner"](x)


class _SmallVGG(torch.nn.Module):
    """VGG's shape in small: conv-BN-ReLU blocks with 2x2 max-pools, a 2x2 adaptive average pool
    (the identity at 16x16 inputs), flatten, and linear-ReLU-dropout twice before the last
    linear."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 16), *block(16, 16), nn.MaxPool2d(2),
                                      *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
                                      *block(32, 32), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4, 64), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(4)
    model = _SmallVGG().eval()
    with torch.no_grad():  # BN statistics that leave a share of every map's ReLU outputs zero
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", channels_last=True)
    return model, ispc.compile(model, data, config=cfg, progress=False)


def test_a_vgg_classifier_runs_in_the_program_on_input_major_weights(vgg):
    """The pools are program ops; the adaptive pool (the identity here), flatten, linears with
    their ReLUs fused and dropouts join the last program; its linears read the modules' weights
    in place (made input-major: one copy). Within float rounding of the per-layer graph."""
    _, c = vgg
    r = _runner(c)
    last = r._programs[-1]
    names = [n.name for n in last._seg]
    assert names[-1] == "ispc_to_contiguous" or "classifier_6" in names[-1]
    x = torch.randn(3, 3, 16, 16)
    assert _served(c, x)
    (_, plan), = last._plans.values()
    kinds = [op.kind for op in plan.program._ops]
    assert kinds.count(native._OP_LINEAR_T) == 3 and native._OP_MAXPOOL in kinds
    assert [op.lo for op in plan.program._ops if op.kind == native._OP_LINEAR_T] == [0.0, 0.0, -float("inf")]
    for i in (0, 3, 6):
        w = c.graph_module.get_submodule(f"classifier.{i}").weight
        assert w.t().is_contiguous() and any(op.w == w.data_ptr() for op in plan.program._ops)
    _matches(c, x)
    with torch.no_grad():
        for shape in [(1, 3, 16, 16), (2, 3, 17, 19)]:  # 17 x 19: pools drop a row and a column
            xs = torch.randn(shape)
            torch.testing.assert_close(c(xs), c.graph_module(xs), rtol=1e-5, atol=1e-5)


def test_a_vgg_whose_adaptive_pool_is_not_the_identity_runs_the_graph(vgg):
    _, c = vgg
    x = torch.randn(2, 3, 32, 32)  # a 4x4 map pooled to 2x2
    assert not _served(c, x)
    with torch.no_grad():
        assert torch.equal(c(x), c.graph_module(x))


def test_a_vgg_keeping_every_channel_equals_the_original():
    torch.manual_seed(5)
    model = _SmallVGG().eval()
    data = [torch.randn(2, 3, 16, 16)]
    c = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=1.0, channels_last=True),
                     progress=False)
    x = torch.randn(2, 3, 16, 16)
    assert _served(c, x)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)


def _changes(c):
    """Changes of state after a first call, each with its undo: a gated layer's activation and
    scale, a dense layer's activation, the input's layout change switched off, the classifier's
    weight replaced by a new tensor."""
    from torch import nn

    from ispc.modules import NhwcDenseConv2d, ToMemoryFormat

    gm = c.graph_module
    gated = next(m for m in gm.modules() if isinstance(m, GatedConv2d) and m.act is not None)
    dense = next(m for m in gm.modules() if isinstance(m, NhwcDenseConv2d) and m.act is not None)
    layout = next(m for m in gm.modules() if isinstance(m, ToMemoryFormat))
    lin = c.graph_module.get_submodule("classifier.1")
    scale = gated.scale
    g = torch.Generator().manual_seed(3)
    new_scale = torch.rand(scale.shape, generator=g) * 4
    weight = lin.weight
    return [
        (lambda: setattr(gated, "act", None), lambda: setattr(gated, "act", "relu6")),
        (lambda: setattr(gated, "scale", new_scale), lambda: setattr(gated, "scale", scale)),
        (lambda: gated.register_buffer("scale", new_scale),
         lambda: gated.register_buffer("scale", scale)),
        (lambda: setattr(dense, "act", None), lambda: setattr(dense, "act", "relu6")),
        (lambda: setattr(layout, "enabled", False), lambda: setattr(layout, "enabled", True)),
        (lambda: setattr(lin, "weight", nn.Parameter(weight.detach() * 2)),
         lambda: setattr(lin, "weight", weight)),
    ]


@pytest.mark.parametrize("change", range(6))
def test_state_changed_after_a_call_is_used(with_classifier, change):
    """Plans are reused on a generation compare: every kind of change the state check covers
    still reaches the next call (and its undo the one after)."""
    c = with_classifier
    x = torch.randn(2, 3, 32, 32)
    do, undo = _changes(c)[change]
    with torch.no_grad():
        before = c(x)
        assert torch.equal(c(x), before)  # the plan reused
        do()
        try:
            after = c(x)
            torch.testing.assert_close(after, c.graph_module(x), rtol=1e-5,
                                       atol=1e-5 * after.abs().max().item())
            if change != 4:  # the layout change off: the same values by the per-layer path
                assert not torch.allclose(after, before, rtol=1e-3, atol=0)
        finally:
            undo()
        torch.testing.assert_close(c(x), before, rtol=0, atol=0)


def test_a_hook_registered_after_a_call_runs(with_classifier):
    c = with_classifier
    x = torch.randn(1, 3, 32, 32)
    gated = next(m for m in c.graph_module.modules() if isinstance(m, GatedConv2d))
    lin = c.graph_module.get_submodule("classifier.1")
    for mod in (gated, lin):
        with torch.no_grad():
            c(x), c(x)
            seen = []
            h = mod.register_forward_pre_hook(lambda *a: seen.append(1))
            try:
                c(x)
            finally:
                h.remove()
            assert seen == [1]
            assert _served(c, x)


class _SmallResNetStem(torch.nn.Module):
    """ResNet's stem in small (7x7 convolution of stride 2, BN, ReLU, 3x3 max-pool of stride 2)
    and a residual block after it."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(True))
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.b(self.a(x)) + x)


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_a_resnet_stem_and_its_pool_run_as_one_op(keep, monkeypatch):
    """The stem's convolution on the native kernel (as latency-aware compiles put ResNet-50's)
    and the max-pool after it are one program op (its map never written whole): bit for bit the
    per-layer graph's, and with every channel kept the original's within float rounding, at odd
    sizes and batches; ISPC_FUSE_POOL=0 keeps them apart with the same results."""
    from ispc.modules import NhwcDenseConv2d
    from passes.base import replace_submodule

    torch.manual_seed(6)
    model = _SmallResNetStem().eval()
    data = [torch.randn(2, 3, 40, 40)]
    c = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=keep, channels_last=True),
                     progress=False)
    gm = c.graph_module
    replace_submodule(gm, "conv1", NhwcDenseConv2d(gm.get_submodule("conv1"), None))
    r = NativePlanRunner(gm)
    prog, = r._programs
    for shape in [(1, 3, 40, 40), (3, 3, 37, 29), (2, 3, 9, 9)]:
        x = torch.randn(shape)
        outs = []
        for fuse in ("1", "0"):
            monkeypatch.setenv("ISPC_FUSE_POOL", fuse)
            prog._plans.clear()
            with torch.no_grad():
                outs.append(r(x))
                want = gm(x)
            (_, plan), = prog._plans.values()
            kinds = [op.kind for op in plan.program._ops]
            assert (native._OP_CONV_MAXPOOL in kinds) == (fuse == "1")
            assert (native._OP_MAXPOOL in kinds) == (fuse == "0")
            assert torch.equal(outs[-1], want)
        assert torch.equal(outs[0], outs[1])


class _Bottleneck(torch.nn.Module):
    """A ResNet-50 block with a downsample: conv3's map is read only by the add with it."""

    def __init__(self, cin=16, width=8, cout=32, stride=1):
        super().__init__()
        nn_ = torch.nn
        self.conv1 = nn_.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn_.BatchNorm2d(width)
        self.conv2 = nn_.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn_.BatchNorm2d(width)
        self.conv3 = nn_.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn_.BatchNorm2d(cout)
        self.downsample = nn_.Sequential(nn_.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn_.BatchNorm2d(cout))
        self.tail = nn_.Conv2d(cout, cout, 1)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.relu(out + self.downsample(x))
        return self.tail(out)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_s_last_1x1_and_its_downsample_run_as_one_op(stride, monkeypatch):
    """conv3 and the downsample (the add fused into one of them) are one program op, bit for bit
    the per-layer graph's and ISPC_FUSE_PAIR=0's, at a batch of one (fused) and of three (the two
    in turn)."""
    torch.manual_seed(7)
    model = _Bottleneck(stride=stride).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    data = [torch.randn(4, 16, 20, 20) for _ in range(2)]
    c = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5, channels_last=True,
                                                           latency_aware=False), progress=False)
    r = _runner(c)
    prog, = r._programs
    for shape in [(1, 16, 20, 20), (3, 16, 14, 18)]:
        x = torch.randn(shape)
        outs = []
        for fuse in ("1", "0"):
            monkeypatch.setenv("ISPC_FUSE_PAIR", fuse)
            prog._plans.clear()
            with torch.no_grad():
                outs.append(c(x))
                want = c.graph_module(x)
            (_, plan), = prog._plans.values()
            kinds = [op.kind for op in plan.program._ops]
            assert (native._OP_CONV_PAIR in kinds) == (fuse == "1")
            assert torch.equal(outs[-1], want)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("budget", [1 << 40, 1, 100_000])
def test_block_outputs_written_over_their_residual_equal_the_graph(monkeypatch, budget):
    """A block's last convolution writes its output into its residual's buffer where the residual
    is read last there, and a pair's first map shares the pair's output buffer: bit for bit the
    per-layer graph's and ISPC_INPLACE=0's, with fewer buffers; chunked runs too."""
    monkeypatch.setenv("ISPC_CHUNK_BYTES", str(budget))
    torch.manual_seed(3)
    nets = [features_only(_compile(resnet20(num_classes=10).eval())), _pair_net()]
    for c, shape in zip(nets, [(3, 3, 32, 32), (1, 16, 20, 20)]):
        prog = _runner(c)._programs[0]
        x = torch.randn(shape)
        outs, nbuf = [], []
        for inplace in ("1", "0"):
            monkeypatch.setenv("ISPC_INPLACE", inplace)
            prog._plans.clear()
            with torch.no_grad():
                outs.append(c(x))
                assert torch.equal(c(x), outs[-1])  # the plan's buffers reused
                want = c.graph_module(x)
            (_, plan), = prog._plans.values()
            nbuf.append(sum(b.numel() for b in plan.buffers))
            assert torch.equal(outs[-1], want)
        assert nbuf[0] < nbuf[1]


def _pair_net():
    torch.manual_seed(7)
    model = torch.nn.Sequential(_Bottleneck(), _Bottleneck(cin=32, cout=32)).eval()
    data = [torch.randn(4, 16, 20, 20) for _ in range(2)]
    return ispc.compile(model, data, config=ispc.GatingConfig(
        keep_ratio=0.5, channels_last=True, latency_aware=False), progress=False)


def test_packed_weights_on_huge_pages_run_pickle_and_copy_as_before(monkeypatch):
    """The runner moves its layers' packed weights into one map of 2 MiB pages (where the kernel
    offers them): the same outputs as the graph and as a model left on the heap, each layer pickled
    at its own size, copies and loaded models that run the same."""
    monkeypatch.setattr(native, "_huge_pages_offered", lambda: True)
    torch.manual_seed(5)
    c = features_only(_compile(resnet20(num_classes=10).eval()))
    layers = [m._nhwc for m in c.modules() if isinstance(getattr(m, "_nhwc", None), native.NhwcConv)]
    assert layers and all(getattr(k, "_huge", False) for k in layers)
    assert native.move_to_huge_pages(layers) == 0  # already there
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = c(x)
        assert torch.equal(got, c.graph_module(x))
        for k in layers:
            assert k.packed.untyped_storage().nbytes() == k.packed.numel() * 4
            again = pickle.loads(pickle.dumps(k))
            assert torch.equal(again.packed, k.packed) and not getattr(again, "_huge", False)
        assert torch.equal(copy.deepcopy(c)(x), got)



@pytest.mark.parametrize("env", [None, "64"])
def test_maps_on_huge_pages_at_batch_one_only_by_default(monkeypatch, env):
    """A plan puts its maps on 2 MiB pages at batch 1 (where huge pages are offered); at larger
    batches only with ISPC_HUGE_MAPS_MAX_BATCH raised. The same outputs either way."""
    monkeypatch.setattr(native, "_huge_pages_offered", lambda: True)
    if env is None:
        monkeypatch.delenv("ISPC_HUGE_MAPS_MAX_BATCH", raising=False)
    else:
        monkeypatch.setenv("ISPC_HUGE_MAPS_MAX_BATCH", env)
    made = []
    real = native.empty_on_huge_pages
    monkeypatch.setattr(native, "empty_on_huge_pages", lambda sizes: made.append(sizes) or real(sizes))
    torch.manual_seed(5)
    c = features_only(_compile(resnet20(num_classes=10).eval()))
    prog = _runner(c)._programs[0]
    for n in (1, 3):
        prog._plans.clear()
        made.clear()
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            got = c(x)
            assert torch.equal(got, c.graph_module(x))
            assert torch.equal(c(x), got)  # the plan's buffers reused
        assert bool(made) == (n == 1 or env is not None)


@pytest.fixture()
def one_program(with_classifier):
    """A compiled model whose graph is one program (a layout change and two dense convolutions):
    its runner serves calls through the short path."""
    from torch import fx, nn

    from ispc.compiled import CompiledModel
    from ispc.modules import NhwcDenseConv2d, ToMemoryFormat

    torch.manual_seed(0)
    root = nn.Module()
    root.cl, root.a, root.b = ToMemoryFormat(True), *(NhwcDenseConv2d(nn.Conv2d(3, 3, 3, padding=1))
                                                      for _ in range(2))
    g = fx.Graph()
    g.output(g.call_module("b", (g.call_module("a", (g.call_module("cl", (g.placeholder("x"),)),)),)))
    c = CompiledModel(fx.GraphModule(root, g), with_classifier.report, with_classifier.config)
    c.use_runner(NativePlanRunner(c.graph_module))
    assert _runner(c)._direct is not None
    return c


def _declines(c, x) -> bool:
    """Whether the compiled model's short path (``NativePlanRunner.serve``) turns ``c(x)`` down."""
    from ispc.compiled import DECLINED

    return _runner(c).serve(c, x) is DECLINED


def test_repeated_calls_take_the_short_path_and_its_answer_is_the_program_s(one_program):
    c = one_program
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        want = c.graph_module(x)
        c(x)
        assert not _declines(c, x)
        got = _runner(c).serve(c, x)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
        assert got is not c(x)  # a fresh output every call: it reaches the caller
        assert not _declines(c, x.clone())  # another tensor of the same layout


def test_the_short_path_declines_every_call_the_full_path_serves_otherwise(one_program):
    """Another shape, strides, dtype, an input needing grad, parameters needing grad in grad
    mode, hooks (the model's own, global, a layer's), a moved generation, cleared plans, a held
    lock, the profiler: each declines, and the call then answers as before."""
    from torch import nn

    c = one_program
    r = _runner(c)
    x = torch.randn(2, 3, 6, 5)
    conv = c.graph_module.get_submodule("a")
    with torch.no_grad():
        want = c.graph_module(x)
        c(x)
        assert not _declines(c, x)
        assert _declines(c, torch.randn(1, 3, 6, 5))
        assert _declines(c, x.contiguous(memory_format=torch.channels_last))
        assert _declines(c, torch.randn(2, 3, 6, 10)[..., ::2])
        assert _declines(c, x.double())
        seen = []
        for register in (c.register_forward_hook, c.register_forward_pre_hook,
                         nn.modules.module.register_module_forward_hook,
                         conv.register_forward_hook):
            h = register(lambda *a: seen.append(1))
            try:
                c(x)
                assert _declines(c, x)
                assert torch.equal(c(x), want)
            finally:
                h.remove()
        assert len(seen) >= 8
        c(x)
        assert not _declines(c, x)
        conv.act = conv.act  # the generation moves
        assert _declines(c, x)
        c(x)
        assert not _declines(c, x)
        r._programs[0]._plans.clear()
        assert _declines(c, x)
        c(x)
        assert r._lock.acquire(blocking=False)
        try:
            assert _declines(c, x)
        finally:
            r._lock.release()
        with torch.autograd.profiler.profile():
            assert _declines(c, x)
    xg = x.clone().requires_grad_(True)
    assert _declines(c, xg) and c(xg).requires_grad
    c.graph_module.requires_grad_(True)
    try:
        assert _declines(c, x)
        assert c(x).requires_grad
    finally:
        c.graph_module.requires_grad_(False)
    with torch.no_grad():
        c(x)
        assert not _declines(c, x)
        assert torch.equal(c(x), want)


def test_a_swapped_native_library_is_the_one_the_short_path_calls(one_program, monkeypatch):
    # benchmarks swap builds per call (kernel_ab.py, layers.py): the short path's bound entry
    # must follow, or every build but the first call's would silently run the first
    import ctypes

    c = one_program
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        want = c(x)
        c(x)
        assert not _declines(c, x)
        other = ctypes.CDLL(native._loaded()._name)  # the same code, another library object
        monkeypatch.setattr(native, "_lib", other)
        assert _declines(c, x)
        assert torch.equal(c(x), want)  # the full path rebinds the plan to ``other``
        assert not _declines(c, x)
        assert _runner(c)._programs[0]._last[4].entry[0] is other.ispc_run_ops
        assert torch.equal(c(x), want)


def test_compiled_and_traced_calls_take_the_full_path(one_program):
    c = one_program
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        want = c.graph_module(x)
        c(x)
        assert torch.equal(torch.compile(c, backend="eager")(x), want)
        traced = torch.jit.trace(c, x, check_trace=False)
        # a trace records the modules' torch computation (oneDNN's convolution), not the native
        # kernel's: the same sums in another order (bit-identical on AVX-512 Zen 4, not on AVX2)
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-6)


def test_a_tensor_that_is_not_strided_is_a_one_line_data_error(one_program):
    # sparse and mkldnn tensors have no strides or no data pointer for the native program: the
    # short path declines them and the call says what to pass instead
    import ispc

    c = one_program
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        want = c(x)
        c(x)
        for other in (x.to_sparse(), x.to_mkldnn()):
            assert _declines(c, other)
            with pytest.raises(ispc.DataError, match=r"dense \(strided\) tensors.*pass x.to_dense\(\)$"):
                c(other)
        assert torch.equal(c(x), want)
