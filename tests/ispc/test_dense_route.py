"""ispc.dense_route: the module a dense route's graph calls, and the graph around it."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from conftest import rel_err
import ispc
from ispc import dense_route as route

pytestmark = pytest.mark.dense_runtimes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, pixels):
        return self.fc(torch.relu(self.conv(pixels)).mean((2, 3)))


@pytest.fixture(scope="module")
def onnx():
    torch.manual_seed(0)
    model = Net().eval()
    return model, route.onnx_bytes(model, torch.randn(2, 3, 8, 8))


def test_the_export_prints_nothing(capfd, caplog, recwarn):
    """Every compile that considers the route exports: the exporter's log lines and deprecation
    warnings ("torchvision is not installed. Skipping ...") stay out of the user's stderr."""
    pytest.importorskip("onnxscript")
    caplog.set_level(logging.INFO)
    data = route.onnx_bytes(Net().eval(), torch.randn(2, 3, 8, 8))
    out, err = capfd.readouterr()
    assert data and out == "" and err == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize("spinning", [True, False])
def test_onnx_runtime_spins_between_calls_unless_told_not_to(onnx, spinning):
    """ONNX Runtime's own default (spinning) unless ``spinning=False``, which stops its workers
    when a call returns; an archive from before the option stopped them and still does."""
    if not route.installed("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    model, data = onnx
    m = route.DenseRuntimeModule(model, "onnxruntime", data, (2, 3, 8, 8), spinning=spinning)
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 8))
    opts = m.__dict__["_session"].get_session_options()
    if spinning:
        with pytest.raises(Exception, match="force_spinning_stop"):  # unset: the default
            opts.get_session_config_entry("session.force_spinning_stop")
    else:
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    old = m.__getstate__()
    del old["spinning"]
    m2 = route.DenseRuntimeModule.__new__(route.DenseRuntimeModule)
    m2.__setstate__(old)
    assert m2.spinning is False


@pytest.mark.parametrize("runtime", route.ROUTE_RUNTIMES)
def test_module_runs_the_runtime_at_any_batch(onnx, runtime):
    if not route.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    model, data = onnx
    m = route.DenseRuntimeModule(model, runtime, data, (2, 3, 8, 8))
    with torch.no_grad():
        for n in (1, 2, 7):
            x = torch.randn(n, 3, 8, 8)
            y = m(x)
            assert y.dtype == torch.float32 and rel_err(y, model(x)) < 1e-5
    if runtime == "openvino":
        assert sorted(m.__dict__["_requests"]) == [(1, 3, 8, 8), (2, 3, 8, 8), (7, 3, 8, 8)]
    else:
        sess = m.__dict__["_session"]
        assert sess is not None
        assert sess.get_session_options().intra_op_num_threads == torch.get_num_threads()


@pytest.mark.parametrize("runtime", route.ROUTE_RUNTIMES)
def test_the_call_writes_into_torch_memory_and_hands_back_its_own_output(onnx, runtime):
    """The hot path (ONNX Runtime's IOBinding after a shape's first call, OpenVINO's request
    with a shared input and a bound output): outputs are the model's, each call's output is its
    own (the next call does not overwrite it), the input is not written, and threads calling at
    once each get their own result."""
    import threading

    if not route.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    model, data = onnx
    m = route.DenseRuntimeModule(model, runtime, data, (2, 3, 8, 8))
    xs = [torch.randn(3, 3, 8, 8) for _ in range(4)]
    before = [x.clone() for x in xs]
    with torch.no_grad():
        refs = [model(x) for x in xs]
        outs = [m(x) for x in xs] + [m(xs[0])]
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(outs, refs + refs[:1]))
        assert all(torch.equal(x, b) for x, b in zip(xs, before))
        assert len({o.data_ptr() for o in outs}) == len(outs)
        if runtime == "onnxruntime":
            assert m.__dict__["_outputs"][(3, 3, 8, 8)][0] == (3, 4)
        got: dict[int, torch.Tensor] = {}

        def work(i):
            with torch.no_grad():
                for _ in range(20):
                    got[i] = m(xs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(rel_err(got[i], refs[i]) < 1e-5 for i in range(4))
        view = torch.randn(3, 8, 8, 3).permute(0, 3, 1, 2)  # not contiguous: made so first
        assert rel_err(m(view), model(view)) < 1e-5


def test_wrap_keeps_the_input_name_and_runtime_only_switches(onnx):
    model, data = onnx
    m = route.DenseRuntimeModule(model, "onnxruntime", data, (2, 3, 8, 8))
    gm = fx.symbolic_trace(model)
    wrapped = route.wrap(gm, m)
    assert route.routed(wrapped) is m and route.routed(gm) is None
    calls = []
    model.conv.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), route.runtime_only(wrapped, False):
        assert rel_err(wrapped(pixels=x), model(x)) < 1e-6  # by keyword, through the torch model
    assert len(calls) == 2 and m.use_runtime


def test_unknown_runtime_refused(onnx):
    with pytest.raises(ValueError, match="unknown dense runtime"):
        route.DenseRuntimeModule(onnx[0], "tensorrt", onnx[1], (2, 3, 8, 8))


@pytest.mark.parametrize("runtime", route.ROUTE_RUNTIMES)
def test_route_runner_outputs_are_not_aliased(onnx, runtime):
    """The runner calls the runtime straight; an output handed back is the caller's: the next
    call does not overwrite it (OpenVINO reuses its request's output buffer)."""
    if not route.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    model, data = onnx
    gm = route.wrap(fx.symbolic_trace(model), route.DenseRuntimeModule(model, runtime, data,
                                                                       (2, 3, 8, 8)))
    runner = route.runner_for(gm)
    assert isinstance(runner, route.RouteRunner) and route.runner_for(fx.symbolic_trace(model)) is None
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y1 = runner(x1)
        kept = y1.clone()
        y2 = runner(x2)
        assert torch.equal(y1, kept) and rel_err(y1, model(x1)) < 1e-5
        assert rel_err(y2, model(x2)) < 1e-5 and y1.data_ptr() != y2.data_ptr()
        y2.add_(1.0)  # writable, and the next call is not changed by it
        assert rel_err(runner(x2), model(x2)) < 1e-5


def test_route_runner_falls_back_to_the_graph(onnx):
    """By keyword the runner calls the graph (which runs the runtime too); with autograd or with
    the runtime switched off, the torch model: gradients flow as through the user's model."""
    model, data = onnx
    m = route.DenseRuntimeModule(model, "onnxruntime", data, (2, 3, 8, 8))
    runner = route.runner_for(route.wrap(fx.symbolic_trace(model), m))
    calls = []
    model.conv.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    runner(x).sum().backward()
    assert x.grad is not None and len(calls) == 1
    with torch.no_grad():
        y = runner(pixels=x.detach())
        assert len(calls) == 1 and rel_err(y, model(x)) < 1e-5 and len(calls) == 2
        with route.runtime_only(runner.graph, False):
            runner(x.detach())
        assert len(calls) == 3
        runner(x.detach())  # the runtime: the torch model is not called
        assert len(calls) == 3
    assert runner(x.detach()).requires_grad and len(calls) == 4  # grad mode, parameters need it
    model.requires_grad_(False)  # frozen (as compile leaves them): the runtime, seen per call
    assert not runner(x.detach()).requires_grad and len(calls) == 4
    model.requires_grad_(True)
    assert runner(x.detach()).requires_grad and len(calls) == 5


def test_time_interleaved_times_each_candidate_in_its_own_worker(onnx, tmp_path):
    """Each candidate in a worker process of its own, all timed in the same rounds (one block
    median per round); its output on the first input comes back for the numerics check, a
    failure as a note without rounds."""
    runtimes = [r for r in route.ROUTE_RUNTIMES if route.installed(r)]
    if not runtimes:
        pytest.skip("no dense runtime installed")
    model, data = onnx
    (tmp_path / "m.onnx").write_bytes(data)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    jobs = {r: {"runtime": "route", "route_runtime": r, "artifact": str(tmp_path / "m.onnx")}
            for r in runtimes}
    jobs["bad"] = {"runtime": "route", "route_runtime": runtimes[0],
                   "artifact": str(tmp_path / "bad.onnx")}
    x = torch.randn(3, 1, 3, 8, 8)  # three inputs of batch 1
    res = route.time_interleaved(jobs, x, threads=1, rounds=3, warmup=1, block_s=0.002,
                                 settle_s=0.0)
    assert sorted(res) == sorted(jobs)
    for r in runtimes:
        assert res[r]["ms"] > 0 and res[r]["note"] == "" and len(res[r]["rounds_ms"]) == 3
        assert rel_err(torch.from_numpy(res[r]["output"]), model(x[0])) < 1e-5
    assert res["bad"]["ms"] is None and res["bad"]["rounds_ms"] == []
    assert res["bad"]["note"].startswith("error")
    assert all(len(res[r]["shares"]) == 3 and min(res[r]["shares"]) >= 0 for r in runtimes)


def test_workers_read_paths_relative_to_the_callers_directory(onnx, tmp_path, monkeypatch):
    """A worker runs in its job folder: a relative artifact path (``peers.py --compiled-dir
    runs/c``) is the caller's, in a fresh worker and in a served one alike."""
    if not route.installed("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    model, data = onnx
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "m.onnx").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    job = {"runtime": "onnxruntime", "artifact": "runs/m.onnx", "threads": 1}
    x = torch.randn(2, 1, 3, 8, 8)
    res = route.time_interleaved({"ort": job}, x, threads=1, rounds=1, warmup=0, block_s=0.0,
                                 settle_s=0.0)
    assert res["ort"]["note"] == "" and res["ort"]["ms"] > 0
    assert rel_err(torch.from_numpy(res["ort"]["output"]), model(x[0])) < 1e-5
    np.save("inputs.npy", x.numpy())
    one = route.run_worker({**job, "inputs": "inputs.npy", "calls": 2, "warmup": 0},
                           Path("."), "w", timeout_s=120)
    assert one["status"] == "ok", one.get("note")


def test_time_interleaved_adds_rounds_while_asked(onnx, tmp_path):
    """After ``rounds``, one round at a time while ``extend`` (shown every round so far) says
    so, up to ``max_rounds``; ``on_round`` after each."""
    if not route.installed("openvino"):
        pytest.skip("openvino not installed")
    model, data = onnx
    (tmp_path / "m.onnx").write_bytes(data)
    jobs = {"a": {"runtime": "route", "route_runtime": "openvino",
                  "artifact": str(tmp_path / "m.onnx")}}
    seen, ticks = [], []

    def extend(sofar):
        seen.append(len(sofar["a"]["rounds_ms"]))
        assert len(sofar["a"]["shares"]) == seen[-1]
        return seen[-1] < 4

    x = torch.randn(1, 1, 3, 8, 8)
    res = route.time_interleaved(jobs, x, threads=1, rounds=2, warmup=0, block_s=0.002,
                                 settle_s=0.0, max_rounds=6, extend=extend,
                                 on_round=lambda: ticks.append(1))
    assert len(res["a"]["rounds_ms"]) == 4 and seen == [2, 3, 4] and len(ticks) == 4
    capped = route.time_interleaved(jobs, x, threads=1, rounds=2, warmup=0, block_s=0.002,
                                    settle_s=0.0, max_rounds=3, extend=lambda s: True,
                                    probe=False)  # (the first call's output is checked)
    assert len(capped["a"]["rounds_ms"]) == 3
    assert rel_err(torch.from_numpy(capped["a"]["output"]), model(x[0])) < 1e-5


def test_block_calls():
    assert route.block_calls(4.0, 0.12) == 30 and route.block_calls(40.0, 0.12) == 3
    assert route.block_calls(1000.0, 1.0, hi=3) == 2 and route.block_calls(0.01, 1.0) == 30


def test_worker_serves_blocks_until_told_to_quit(onnx, tmp_path):
    """Serve mode: one answer after preparing (with a probe call), one per block asked for,
    and the process ends on quit; what a library prints does not reach the replies."""
    import io
    import runpy

    runtime = next((r for r in route.ROUTE_RUNTIMES if route.installed(r)), None)
    if runtime is None:
        pytest.skip("no dense runtime installed")
    (tmp_path / "m.onnx").write_bytes(onnx[1])
    np.save(tmp_path / "in.npy", np.ones((2, 1, 3, 8, 8), np.float32))
    w = runpy.run_path(str(route.WORKER))
    job = {"runtime": runtime, "route": True, "artifact": str(tmp_path / "m.onnx"), "threads": 1,
           "inputs": str(tmp_path / "in.npy"), "check_output": str(tmp_path / "out.npy")}
    replies = io.StringIO()
    w["serve"](job, iter(['{"warmup": 1, "calls": 4}\n', '{"warmup": 0, "calls": 2}\n',
                          '{"quit": true}\n', '{"warmup": 0, "calls": 9}\n']), replies)
    lines = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert lines[0]["status"] == "ok" and lines[0]["probe_ms"] > 0
    assert [len(line["times_ms"]) for line in lines[1:]] == [4, 2]
    assert np.load(tmp_path / "out.npy").shape == (1, 4)


@pytest.mark.parametrize("runtime", route.ROUTE_RUNTIMES)
def test_worker_sets_up_the_runtime_without_torch(onnx, runtime, tmp_path):
    """The timing worker sets its runtime up with the route's own code (``_runtime_sessions``,
    loaded by path) and imports neither torch nor ispc beside it."""

    if not route.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    (tmp_path / "m.onnx").write_bytes(onnx[1])
    code = (f"import runpy, sys, numpy as np; w = runpy.run_path({str(route.WORKER)!r}); "
            f"call, info = w['_prepare']({{'runtime': {runtime!r}, 'threads': 1, 'route': True, "
            f"'artifact': {str(tmp_path / 'm.onnx')!r}}}, [np.ones((2, 3, 8, 8), np.float32)]); "
            "out = info['to_numpy'](call(np.ones((2, 3, 8, 8), np.float32))); "
            "print(out.shape, 'torch' in sys.modules or 'ispc' in sys.modules)")
    env = route.worker_env(1, runtime)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-800:]
    assert res.stdout.split()[-3:] == ["(2,", "4)", "False"]


def test_timing_workers_keep_freed_memory_as_glibc_reads_it():
    """The workers' allocator settings, spelled as glibc reads them (a misspelt name is silently
    ignored and every large allocation becomes an mmap + page faults per call)."""
    env = route.worker_env(2, "openvino")
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20) == str(route.MMAP_THRESHOLD)
    assert env["OMP_NUM_THREADS"] == "2" and "PYTHONPATH" not in {
        k for k in env if env.get(k) != os.environ.get(k)}
    assert route.worker_env(2, "ispc")["PYTHONPATH"]  # a torch artifact imports ispc there


def test_a_worker_imports_this_ispc_not_a_folder_named_ispc(tmp_path, monkeypatch):
    """An editable install's package is found by a finder that runs after the path's: a folder
    named ispc on the path (pytest puts tests/, holding tests/ispc, there) would otherwise import
    in the worker as an empty namespace package."""
    (tmp_path / "ispc").mkdir()
    root = str(Path(ispc.__file__).resolve().parent.parent)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + [p for p in sys.path if p not in ("", root)])
    env = route.worker_env(1, "ispc")
    res = subprocess.run([sys.executable, "-c", "import ispc; print(hasattr(ispc, 'load'))"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["True"], res.stderr[-800:]


def test_rel_err_of_arrays_and_tensors():
    """One check for the route and the benchmark: max |a - b| / max |b|, inf on a shape mismatch."""
    b = torch.tensor([[1.0, -4.0]])
    assert route.rel_err(torch.tensor([[1.0, -3.0]]), b) == pytest.approx(0.25)
    assert route.rel_err(b.numpy(), b) == 0.0
    assert route.rel_err(torch.zeros(2), b) == float("inf")
