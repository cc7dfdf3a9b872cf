"""CUDA-graph backend: its refusals without CUDA, its static-buffer bookkeeping (with a stand-in
for graph capture that reruns the module into the captured outputs, as a replay rewrites them),
and on a GPU the real thing against eager execution."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

import ispc
from conftest import rel_err
from ispc.backends import cuda_graphs as cg
from ispc.errors import BackendUnavailableError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.body = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)
        self.seen: list[bool] = []  # whether each call's input was channels-last

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)
        y = torch.relu(self.body(self.stem(x)) + self.stem(x))
        return {"logits": self.head(y.mean((2, 3))), "map": y}


class Plain(nn.Module):
    """What ispc compiles (traceable: no Python-side bookkeeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.body = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.body(self.stem(x)) + self.stem(x))
        return self.head(y.mean((2, 3)))


class FakeCapture:
    """Stands in for ``_capture_cuda``: the captured outputs are buffers each replay rewrites in
    place by running the module again on the static inputs (what a graph replay does)."""

    def __init__(self) -> None:
        self.captures = 0
        self.warmups = 0

    def __call__(self, fn, warmup):
        self.captures += 1
        self.warmups += warmup
        outputs = fn()

        def replay():
            fresh = fn()
            tree_map(lambda o, f: o.copy_(f), outputs, fresh)

        return outputs, replay, None


def test_static_inputs_outputs_and_one_graph_per_signature():
    torch.manual_seed(0)
    net = Net().eval()
    fake = FakeCapture()
    g = cg.CUDAGraphModule(net, warmup=2, _capture=fake)
    with torch.no_grad():
        for shape in [(2, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]:
            x = torch.randn(shape)
            got, want = g(x), net(x)
            assert rel_err(got["logits"], want["logits"]) < 1e-6  # fresh inputs reach the graph
    assert fake.captures == g.captured == 2 and fake.warmups == 4


def test_clone_outputs_or_the_graphs_own():
    fake = FakeCapture()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        shared = cg.CUDAGraphModule(Net().eval(), clone_outputs=False, _capture=fake)
        assert shared(x)["map"] is shared(x)["map"]  # the next replay overwrites it
        own = cg.CUDAGraphModule(Net().eval(), _capture=fake)
        a = own(x)["map"]
        b = own(torch.randn(1, 3, 6, 6))["map"]
        assert a is not b and not torch.equal(a, b)


def test_channels_last_runs_a_copy_on_nhwc_maps():
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = cg.CUDAGraphModule(net, channels_last=True, _capture=FakeCapture())
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        got = g(x)
        want = net(x)
    assert g.module is not net and g.module.seen and all(g.module.seen)
    assert g.module.body.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.body.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert rel_err(got["logits"], want["logits"]) < 1e-5


def test_oldest_graph_dropped_and_grad_calls_run_eagerly():
    fake = FakeCapture()
    net = Net()
    g = cg.CUDAGraphModule(net, max_graphs=2, _capture=fake)
    with torch.no_grad():
        for n in (1, 2, 3):
            g(torch.randn(n, 3, 6, 6))
    assert g.captured == 2
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    out = g(x)  # autograd: the module itself, not a graph
    out["logits"].sum().backward()
    assert x.grad is not None and fake.captures == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusals")
def test_refused_without_cuda():
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        cg.CUDAGraphModule(Net())
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        cg.lower(Net())
    # before any calibration work
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        ispc.compile(Plain(), torch.randn(4, 3, 8, 8), backend="cuda_graphs", progress=False)


def test_unknown_method_refused():
    with pytest.raises(BackendUnavailableError, match="method"):
        cg.lower(Net(), method="fastest")
    assert "cuda_graphs" in ispc.BACKENDS


@needs_cuda
def test_cpu_model_refused_on_a_gpu_machine():
    with pytest.raises(BackendUnavailableError, match="GPU first"):
        cg.lower(Net())


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_model_replayed_equals_eager(channels_last):
    torch.manual_seed(0)
    model = Plain().eval().cuda()
    data = [torch.randn(8, 3, 12, 12, device="cuda") for _ in range(2)]
    compiled = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk"),
                            backend="cuda_graphs", progress=False)
    assert compiled.gated_modules()
    runner = cg.CUDAGraphModule(compiled.graph_module, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 3, 12, 12, device="cuda")
            # the same module run eagerly on the same layout: the same kernels, the same result
            assert rel_err(runner(x), runner.module(x.contiguous(memory_format=fmt))) < 1e-5
            assert rel_err(compiled(x), compiled.graph_module(x)) < 1e-5
