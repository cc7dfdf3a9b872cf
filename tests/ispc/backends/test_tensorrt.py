"""TensorRT backend: what runs without TensorRT (errors, the converters' decomposition in plain
torch, converter selection, the exported op); engine builds need CUDA + torch_tensorrt."""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err
from ispc.backends import tensorrt as trt_backend
from ispc.errors import BackendUnavailableError
from ispc.export import export_program, gated_nodes
from ispc.ops import gated_conv as gc

HAS_TRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None

CASES = [(gc.TOPK, 0.0, 5, gc.SALIENCY_L2), (gc.TOPK, 0.0, 5, gc.SALIENCY_L1),
         (gc.THRESHOLD, 0.8, 0, gc.SALIENCY_L2), (gc.THRESHOLD, 0.7, 0, gc.SALIENCY_L1),
         (gc.TOPK, 0.0, 0, gc.SALIENCY_L2), (gc.TOPK, 0.0, 12, gc.SALIENCY_L2),
         (gc.THRESHOLD, 0.0, 0, gc.SALIENCY_L2)]


@pytest.mark.parametrize("dynamic_batch", [False, True])
@pytest.mark.parametrize("mode,thr,k,sal", CASES)
def test_decomposition_matches_reference(dynamic_batch, mode, thr, k, sal):
    x, w = torch.randn(3, 12, 7, 6), torch.randn(5, 12, 3, 3)
    b, scale = torch.randn(5), torch.rand(12) + 0.5
    for args in [(2, 1, 1, 0, 1, 2, mode, thr, k, sal), (1, 1, 1, 1, 1, 1, mode, thr, k, sal)]:
        got = trt_backend.decompose_reference(x, w, b, scale, *args, dynamic_batch=dynamic_batch)
        want = gc.gated_conv2d_reference(x, w, b, scale, *args)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5


def test_static_decomposition_really_gathers():
    """The static-batch path convolves k gathered channels per instance, not a masked input."""
    seen = []

    class Spy(trt_backend.TorchBuilder):
        def conv(self, x, w, b, stride, pad, dil, groups):
            seen.append((tuple(x.shape), tuple(w.shape), groups))
            return super().conv(x, w, b, stride, pad, dil, groups)

    x, w = torch.randn(3, 12, 7, 7), torch.randn(5, 12, 3, 3)
    trt_backend.decompose(Spy(), x, w, torch.randn(5), torch.ones(12), (1, 1), (1, 1), (1, 1),
                          gc.TOPK, 0.0, 4, gc.SALIENCY_L2)
    assert seen == [((1, 3 * 4, 7, 7), (3 * 5, 4, 3, 3), 3)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU())
        self.body = nn.Conv2d(24, 24, 3, padding=1)
        self.down = nn.Conv2d(24, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.down(torch.relu(self.body(self.stem(x))))


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    out = {}
    for mode in ("topk", "threshold"):
        c = ispc.compile(Net().eval(), data, progress=False,
                         config=ispc.GatingConfig(keep_ratio=0.5, mode=mode))
        out[mode] = (c, export_program(c, data[0][:4]))
    return out


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_exported_graph_holds_exactly_the_converter_target(exported, mode):
    compiled, ep = exported[mode]
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    gated = [n for n in calls if n.target is trt_backend.CONVERTER_TARGET]
    assert len(gated) == len(compiled.gated_modules()) == 2
    assert gated == gated_nodes(ep)
    assert not [n for n in calls if "ispc" in str(n.target) and n not in gated]
    # Torch-TensorRT decomposes the program before conversion: the custom op must survive that
    decomposed = ep.run_decompositions()
    assert len(gated_nodes(decomposed)) == 2


def test_converter_selection(exported, monkeypatch):
    topk = gated_nodes(exported["topk"][1])
    thr = {n.args[4]: n for n in gated_nodes(exported["threshold"][1])}  # by stride
    assert all(trt_backend.takes_topk_converter(n, None) for n in topk)
    assert not any(trt_backend.takes_masked_threshold(n, None) for n in topk)
    assert not any(trt_backend.takes_plugin(n, None) for n in topk)
    assert all(trt_backend.takes_masked_threshold(n, None) for n in thr.values())
    assert not any(trt_backend.takes_topk_converter(n, None) for n in thr.values())
    monkeypatch.setitem(trt_backend._state, "plugin", True)  # as after a successful registration
    assert trt_backend.takes_plugin(thr[1], None)      # stride 1: the Triton plugin
    assert not trt_backend.takes_plugin(thr[2], None)  # stride 2: masked-dense layers


def _generated_descriptor_dims(stride: int) -> list[int]:
    """Torch-TensorRT's generated plugin shape descriptor, re-enacted: run the fake kernel on
    symbolic sizes, lambdify each output dim (module "math"), evaluate on concrete sizes."""
    import sympy
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()

    def sym(i, j):
        src = LocalSource(f"t{i}_{j}")
        return env.create_symintnode(env.create_symbol(5, source=src,
                                                       dynamic_dim=DimDynamic.DYNAMIC),
                                     hint=5, source=src)

    syms = [[sym(i, j) for j in range(nd)] for i, nd in enumerate((4, 4, 1, 1))]
    with FakeTensorMode(shape_env=env):
        out = torch.ops.ispc.gated_conv2d(*[torch.randn(s) for s in syms], stride, stride, 1, 1,
                                          1, 1, gc.THRESHOLD, 0.5, 0, 0)
    exprs = [s.node.expr for s in itertools.chain.from_iterable(syms)]
    clean = [sympy.Symbol(f"_a{j}") for j in range(len(exprs))]
    concrete = [3, 8, 17, 15, 6, 8, 3, 3, 6, 8]
    return [sympy.lambdify(tuple(clean), d.node.expr.subs(dict(zip(exprs, clean))), "math")(
        *concrete) if hasattr(d, "node") else int(d) for d in out.shape]


def test_generated_plugin_descriptor_handles_stride1_only():
    """Why the plugin converter is limited to stride 1 (see the module docstring)."""
    assert _generated_descriptor_dims(1) == [3, 6, 17, 15]
    with pytest.raises(NameError, match="FloorDiv"):
        _generated_descriptor_dims(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_unavailable_without_cuda(exported):
    compiled, _ = exported["topk"]
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        trt_backend.require_tensorrt()
    with pytest.raises(BackendUnavailableError):
        trt_backend.compile_tensorrt(compiled, torch.randn(2, 3, 16, 16))
    with pytest.raises(BackendUnavailableError):
        trt_backend.load_engine("/nonexistent.ep")
    assert isinstance(BackendUnavailableError("x"), ispc.IspcError)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("torch_tensorrt")
                    is not None, reason="checks the missing-torch_tensorrt error on a GPU machine")
def test_unavailable_without_torch_tensorrt():
    with pytest.raises(BackendUnavailableError, match="torch-tensorrt"):
        trt_backend.require_tensorrt()


@pytest.mark.skipif(not HAS_TRT, reason="needs a CUDA GPU and torch_tensorrt")
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_engine_matches_eager(exported, mode, tmp_path):  # pragma: no cover - GPU only
    compiled, _ = exported[mode]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    trt_mod = trt_backend.compile_tensorrt(compiled, x)
    with torch.no_grad():
        want = compiled(x)
        assert rel_err(trt_mod(x.cuda()).cpu(), want) < 1e-3
    path = tmp_path / "engine.ep"
    trt_backend.save_engine(trt_mod, path, x)
    loaded = trt_backend.load_engine(path)
    with torch.no_grad():
        assert rel_err(loaded(x.cuda()).cpu(), want) < 1e-3
