"""ispc.serialization: a safe save/load round trip (no arbitrary unpickling), fresh process too."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import fx, nn

import ispc
from conftest import rel_err
from zoo import SmallResidualNet
from ispc.serialization import ArchiveError, load, save


@pytest.fixture(scope="module", params=["topk", "threshold"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode=request.param)
    compiled = ispc.compile(SmallResidualNet().eval(), data, config=cfg, progress=False)
    path = tmp_path_factory.mktemp("ser") / f"model_{request.param}.ispc"
    save(compiled, path)
    return compiled, path, data


def test_round_trip_equal_any_batch(saved):
    compiled, path, _ = saved
    loaded = load(path)
    assert isinstance(loaded, ispc.CompiledModel)
    assert isinstance(loaded.graph_module, fx.GraphModule)
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, 3, 16, 16)
            assert rel_err(loaded(x), compiled(x)) < 1e-6


def test_report_config_and_modules_survive(saved):
    compiled, path, data = saved
    loaded = load(path)
    assert loaded.report.to_dict() == compiled.report.to_dict()
    assert loaded.config == compiled.config
    assert loaded.backend == compiled.backend
    gated, orig = loaded.gated_modules(), compiled.gated_modules()
    assert sorted(gated) == sorted(orig)  # same qualified names as the report's layers
    for name, m in gated.items():
        assert isinstance(m, ispc.GatedConv2d)
        assert (m.mode, m.k, m.stride, m.padding) == (orig[name].mode, orig[name].k,
                                                        orig[name].stride, orig[name].padding)
        assert m.threshold == orig[name].threshold
        if hasattr(m, "strategy"):  # the eager CPU kernel chosen at compile time
            assert m.strategy == orig[name].strategy
        assert torch.equal(m.weight, orig[name].weight) and torch.equal(m.scale, orig[name].scale)
    # plain convs / linears come back as modules too, so measure() counts the same MACs
    kinds = {type(m) for m in loaded.graph_module.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds
    got, want = loaded.measure(data, progress=False), compiled.measure(data, progress=False)
    assert got["dense_macs"] == pytest.approx(want["dense_macs"])
    assert got["executed_macs"] == pytest.approx(want["executed_macs"])


def test_archive_holds_json_and_weights_only(saved):
    _, path, _ = saved
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "weights.pt"]
        manifest = json.loads(zf.read("manifest.json"))
        weights = torch.load(io.BytesIO(zf.read("weights.pt")), weights_only=True)
    targets = {n["target"] for n in manifest["program"]["nodes"]}
    assert "ispc::gated_conv2d.default" in targets
    assert all(isinstance(v, torch.Tensor) for v in weights.values())


def _run_loaded(path, x, tmp_path, then: str) -> tuple[str, torch.Tensor]:
    """``ispc.load(path)`` as ``m`` in a fresh process, ``m(x)`` there without autograd, then the
    code ``then``: its stdout and ``m(x)``."""
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, ispc\n"
            "m = ispc.load(sys.argv[1])\n"
            "x = torch.load(sys.argv[2], weights_only=True)\n"
            "with torch.no_grad():\n"
            "    torch.save(m(x), sys.argv[3])\n" + then + "\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, torch.load(tmp_path / "y.pt", weights_only=True)


def test_load_in_fresh_process(saved, tmp_path):
    compiled, path, _ = saved
    x = torch.randn(3, 3, 16, 16)
    stdout, y = _run_loaded(path, x, tmp_path, "print(len(m.gated_modules()), m.config.mode)")
    assert stdout.split() == [str(len(compiled.gated_modules())), compiled.config.mode]
    with torch.no_grad():
        assert rel_err(y, compiled(x)) < 1e-6


def test_leaf_modules_dropped_with_note(saved, tmp_path):
    compiled, _, _ = saved
    with_leaf = ispc.CompiledModel(compiled.graph_module, compiled.report,
                                   compiled.config.replace(leaf_modules=(nn.ReLU,)))
    path = save(with_leaf, tmp_path / "leaf.ispc")
    loaded = load(path)
    assert loaded.config.leaf_modules == ()
    assert loaded.config == compiled.config.replace(leaf_modules=())
    assert any("torch.nn.modules.activation.ReLU" in n for n in loaded.report.notes)


def _rewrite(src, dst, *, manifest=None, weights=None):
    with zipfile.ZipFile(src) as zf:
        m = json.loads(zf.read("manifest.json"))
        w = zf.read("weights.pt")
    if manifest is not None:
        manifest(m)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("manifest.json", json.dumps(m))
        zf.writestr("weights.pt", w if weights is None else weights)
    return dst


@pytest.mark.parametrize("target", ["py:os.system", "py:builtins.eval", "os::system.default",
                                    "aten::__class__.default", "nosuchns::op.default"])
def test_refuses_unknown_callables(saved, tmp_path, target):
    _, path, _ = saved

    def edit(m):
        m["program"]["nodes"][0]["target"] = target

    bad = _rewrite(path, tmp_path / "bad.ispc", manifest=edit)
    with pytest.raises(ArchiveError):
        load(bad)


class _Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["ISPC_EVIL_DIR"],))


def test_refuses_pickled_objects_in_weights(saved, tmp_path, monkeypatch):
    _, path, _ = saved
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ISPC_EVIL_DIR", str(marker))
    buf = io.BytesIO()
    torch.save({"stem.0.weight": _Evil()}, buf)
    bad = _rewrite(path, tmp_path / "evil.ispc", weights=buf.getvalue())
    with pytest.raises(ArchiveError):
        load(bad)
    assert not marker.exists()


def test_refuses_non_archives(tmp_path):
    p = tmp_path / "junk.ispc"
    p.write_bytes(b"not a zip")
    with pytest.raises(ArchiveError):
        load(p)
    with zipfile.ZipFile(tmp_path / "other.ispc", "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "something-else"}))
        zf.writestr("weights.pt", b"")
    with pytest.raises(ArchiveError):
        load(tmp_path / "other.ispc")


def test_save_needs_example_without_recorded_shape():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    compiled = ispc.compile(m, config=ispc.GatingConfig(mode="topk"), progress=False)
    with pytest.raises(ValueError, match="example_inputs"):
        save(compiled, "/nonexistent/never-written.ispc")


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_loaded_model_pools_like_the_compiled_one(name, tmp_path):
    from ispc.examples.models import create_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    compiled = ispc.compile(create_model(name).eval(), [x], config=ispc.GatingConfig(keep_ratio=0.5))
    save(compiled, tmp_path / "m.ispc")
    loaded = load(tmp_path / "m.ispc")

    def pools(gm):
        return sorted(type(m).__name__ for m in gm.modules() if isinstance(m, nn.MaxPool2d))

    assert pools(loaded.graph_module) == pools(compiled.graph_module)
    assert pools(loaded.graph_module)  # ChannelsLastMaxPool2d (ResNet) / StridedMaxPool2d (VGG)
    assert not any("max_pool" in str(n.target) for n in loaded.graph_module.graph.nodes
                   if n.op == "call_function")
    with torch.no_grad():
        assert torch.equal(loaded(x), compiled(x))
    save(loaded, tmp_path / "again.ispc")  # the pools export back to aten.max_pool2d
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "again.ispc")(x), compiled(x))


def test_archive_written_by_0_1_0_still_loads():
    """An archive saved by ispc 0.1.0 (tests/fixtures/README.md) loads and gives the outputs it
    gave when it was saved."""
    from pathlib import Path

    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    io_ = torch.load(fixtures / "archive_v1_topk_io.pt", weights_only=True)
    loaded = load(fixtures / "archive_v1_topk.ispc")
    assert sorted(loaded.gated_modules()) == io_["gated"]
    assert loaded.config.mode == "topk" and loaded.report.summary["layers_gated"] == 1
    from ispc.ops import native

    if native.available():  # the kernel chosen when it was saved
        assert {n: m.strategy for n, m in loaded.gated_modules().items()} == io_["strategies"]
    with torch.no_grad():
        assert rel_err(loaded(io_["x"]), io_["y"]) < 1e-6


@pytest.fixture(scope="module")
def routed_archive(tmp_path_factory):
    from ispc import dense_route

    runtime = next((r for r in dense_route.ROUTE_RUNTIMES if dense_route.installed(r)), None)
    if runtime is None:
        pytest.skip("no dense runtime installed")
    torch.manual_seed(0)
    model = SmallResidualNet().eval()
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    compiled = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=1.0,
                                                                  dense_route=runtime),
                            progress=False)
    assert dense_route.routed(compiled.graph_module) is not None
    path = tmp_path_factory.mktemp("route") / "routed.ispc"
    save(compiled, path)
    return model, compiled, path, runtime


@pytest.mark.dense_runtimes
def test_dense_route_round_trip_in_fresh_process(routed_archive, tmp_path):
    model, compiled, path, runtime = routed_archive
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert zf.read("dense_route.onnx") == compiled.graph_module.dense_route.onnx
    assert manifest["dense_route"]["runtime"] == runtime
    x = torch.randn(3, 3, 16, 16)
    stdout, y = _run_loaded(path, x, tmp_path, (
        "from ispc.dense_route import routed\n"
        "r = routed(m.graph_module)\n"
        "print(r.runtime, r.__dict__['_session'] is not None or bool(r.__dict__['_requests']))"))
    assert stdout.split() == [runtime, "True"]  # the loaded model ran the runtime
    with torch.no_grad():
        assert rel_err(y, model(x)) < 1e-5
    loaded = load(path)
    assert loaded.report.summary["dense_route"] == compiled.report.summary["dense_route"]
    assert manifest["dense_route"]["spinning"] is True
    assert dense_route_of(loaded).spinning is True


@pytest.mark.dense_runtimes
def test_dense_route_spinning_round_trip_and_old_archives(routed_archive, tmp_path):
    """The route's spinning setting is saved; an archive from before it (no entry) loads with
    the workers stopped after each call, as it was compiled."""
    _, compiled, path, _ = routed_archive
    for entry, want in ((False, False), (None, False), (True, True)):
        old = tmp_path / f"{entry}.ispc"
        with zipfile.ZipFile(path) as zf, zipfile.ZipFile(old, "w") as out:
            for item in zf.infolist():
                data = zf.read(item)
                if item.filename == "manifest.json":
                    manifest = json.loads(data)
                    manifest["dense_route"].pop("spinning")
                    if entry is not None:
                        manifest["dense_route"]["spinning"] = entry
                    data = json.dumps(manifest).encode()
                out.writestr(item, data)
        assert dense_route_of(load(old)).spinning is want
    bad = tmp_path / "bad.ispc"
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(bad, "w") as out:
        for item in zf.infolist():
            data = zf.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["dense_route"]["spinning"] = "yes"
                data = json.dumps(manifest).encode()
            out.writestr(item, data)
    with pytest.raises(ispc.IspcError, match="bad dense route entry"):
        load(bad)


def dense_route_of(compiled):
    from ispc.dense_route import routed

    return routed(compiled.graph_module)


@pytest.mark.dense_runtimes
def test_dense_route_load_without_its_runtime(routed_archive, monkeypatch):
    from ispc import dense_route

    _, _, path, runtime = routed_archive
    monkeypatch.setattr(dense_route, "installed", lambda r: False)
    with pytest.raises(ispc.IspcError, match=f"pip install {runtime}") as err:
        load(path)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not ispc.ops.native.available(), reason="the native kernel is not built here")
def test_timed_winograd_choice_survives_the_round_trip(tmp_path):
    """A gated 3x3 layer whose nhwc algorithm was timed (KernelChoice.winograd) runs it again
    after loading, whatever the rule would pick there."""
    from ispc.passes import apply_kernel, records

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(48, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
    x = torch.randn(4, 3, 16, 16)
    compiled = ispc.compile(model, [x], config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                                 channels_last=True), progress=False)
    nodes = {n.target: n for n in compiled.graph_module.graph.nodes if n.op == "call_module"}
    forced = {}
    for name, m in compiled.gated_modules().items():
        if m.strategy == "nhwc" and m.in_channels >= 32:
            choice = records(nodes[name]).kernel
            flip = not m.prepared.winograd
            apply_kernel(nodes[name], type(choice)(strategy="nhwc", cost_model="measured",
                                                   winograd=flip), m)
            forced[name] = flip
    assert forced, "a gated 3x3 layer runs the nhwc kernel"
    save(compiled, tmp_path / "m.ispc")
    loaded = load(tmp_path / "m.ispc")
    for name, flip in forced.items():
        m = loaded.gated_modules()[name]
        assert m.prepared.winograd is flip and records(
            next(n for n in loaded.graph_module.graph.nodes if n.target == name)).kernel.winograd is flip
    with torch.no_grad():
        assert rel_err(loaded(x), compiled(x)) < 1e-5
