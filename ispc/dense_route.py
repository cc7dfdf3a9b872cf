"""The dense route: a compiled model that runs the user's dense model in the fastest installed
dense runtime (ONNX Runtime or OpenVINO, float32), where no gate pays (issue 26: never slower than
the best dense runtime).

The ``dense_route`` pass (``passes/dense_route.py``) decides; this module holds what it builds:
:class:`DenseRuntimeModule`, the one module the compiled graph calls, with the model as ONNX bytes
(:func:`export_dense_onnx`, also what ``ispc.runtimes`` times the dense peers with) and a session
created on its first call with the torch thread count of that moment. The module keeps an eval
copy of the user's model and runs it instead where the runtime cannot: under ``torch.export``,
``torch.compile`` or fx tracing (so saving, ONNX export and the other backends see a plain torch
model), with autograd, on another device or dtype, at another input size than exported, and
while :meth:`CompiledModel.measure` hooks its layers. Both compute the user's model. A compiled
model's runner (:class:`RouteRunner`) calls the runtime straight. The pass times its candidates
with :func:`time_interleaved`: each in a worker process of its own (the benchmark's worker, which
``ispc.runtimes`` runs through :func:`run_worker` too), all alive at once and timed in turn.

Thread pools: ONNX Runtime's workers spin after a call by default and take the cores from the
torch work that follows in the same process (a 0.87 ms 3x3 convolution ran 1.7-3.3 ms right after
a call); without spinning (``session.intra_op.allow_spinning=0``) ONNX Runtime itself loses up to
~40% on small models (MobileNetV2 3.0 -> 4.2 ms). ``spinning=False`` keeps spinning within a call
and stops it when the call returns (``session.force_spinning_stop=1``): the convolution after it
ran 0.95 ms, at a cost that depends on the machine (MobileNetV2 3.07 ms on a Zen 4 EPYC, 2%; 15-45%
on a Zen 3 one). The default keeps ONNX Runtime's own spinning, as a user deploying it gets it
(``GatingConfig.route_spinning``; docs/dense_route.md). OpenVINO's pool does not slow torch work
after a call and needs no setting.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from ._runtime_sessions import ort_session, ov_compiled
from .errors import BackendUnavailableError

__all__ = ["ROUTE_RUNTIMES", "DenseRuntimeModule", "RouteRunner", "export_dense_onnx", "onnx_bytes",
           "installed", "require_runtime", "routed", "wrap", "runtime_only", "runner_for",
           "worker_env", "run_worker", "time_interleaved", "block_calls", "rel_err"]

#: the dense runtimes a route may use, in the order an untimed route prefers them (OpenVINO needs
#: no thread-pool setting in a torch process; the two ran within ~3% of each other here)
ROUTE_RUNTIMES: tuple[str, ...] = ("openvino", "onnxruntime")
#: runtime -> the distribution that provides it
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
#: the submodule name of the route in a compiled graph
NAME = "dense_route"
#: the timing worker (a script: an ONNX Runtime or OpenVINO worker imports no torch, no ispc)
WORKER = Path(__file__).with_name("_runtime_worker.py")
_BOOTSTRAP = ("import runpy, sys; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
#: glibc's largest M_MMAP_THRESHOLD on 64-bit (a larger value is ignored)
MMAP_THRESHOLD = 32 << 20
#: the pause after each block of timed calls of interleaved workers (time_interleaved): a thread
#: pool that spins after its last call (libgomp under ispc's kernels and torch, OpenVINO's)
#: otherwise takes a core from the next worker's block. Without it, on MobileNetV2 at batch 1
#: (2-core AMD EPYC), ONNX Runtime and OpenVINO timed beside ispc's model read 6.0-6.8 ms, with
#: 30 ms 4.4 ms, as in processes timed one after another (docs/dense_route.md)
SETTLE_S = 0.05
#: a worker job's entries that are file paths (made absolute before the worker starts)
_PATH_KEYS = ("artifact", "inputs", "main_path")
#: the runtimes that read the ONNX export (the others' workers read a pickled torch model)
_ONNX_RUNTIMES = ("onnxruntime", "openvino", "openvino_default")


def export_dense_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """The user's model, unchanged, as ONNX with a dynamic batch dimension (what ONNX Runtime and
    OpenVINO read). Exports an eval-mode copy; the exporter's own prints are silenced."""
    work = copy.deepcopy(model).eval()
    x = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
    path = Path(path)
    with contextlib.redirect_stdout(io.StringIO()), _exporter_quiet(), torch.no_grad():
        torch.onnx.export(work, (x,), str(path), dynamo=True, input_names=["input"],
                          output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    return path


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's log lines and deprecation warnings held back (e.g. "torchvision is not
    installed. Skipping torchvision::nms" per call): every compile that considers the route
    exports, and they are the exporter's business, not the user's. Errors still raise."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """:func:`export_dense_onnx` into memory."""
    with tempfile.TemporaryDirectory() as tmp:
        return export_dense_onnx(model, example, Path(tmp) / "model.onnx").read_bytes()


def rel_err(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|`` in float64 (``inf`` where the shapes differ): how the route and
    the benchmark check a runtime's output against the model's (arrays or CPU tensors)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s package is installed (package metadata only: importing a runtime
    starts its thread pool)."""
    try:
        metadata.version(PACKAGES[runtime])
        return True
    except metadata.PackageNotFoundError:
        return False


def require_runtime(runtime: str, why: str) -> None:
    """Raise a one-line :class:`BackendUnavailableError` when ``runtime`` is not installed."""
    if not installed(runtime):
        raise BackendUnavailableError(f"{why} needs {runtime}, which is not installed here: "
                                      f"pip install {PACKAGES[runtime]} (or ispc[peers])")


def worker_env(threads: int, runtime: str) -> dict[str, str]:
    """The environment of a timing worker: ``threads`` everywhere, glibc keeping freed memory
    (the environment form of :func:`ispc.timing.retain_freed_memory`); a worker that reads a
    torch model or an ispc archive imports what this process can."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    })
    if runtime not in _ONNX_RUNTIMES:
        # this process's ispc first: a namespace folder named ispc on the path (a test tree's
        # tests/ispc) must not shadow an editable install's package in the worker
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [here] + [p for p in sys.path if p and os.path.isdir(p) and p != here])
    if runtime == "inductor":
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no pool of compile processes left idling
    return env


def _absolute(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with its file paths absolute: the worker runs in its job folder, where a path
    relative to the caller's directory (``peers.py --compiled-dir runs/c``) names nothing."""
    return {k: str(Path(v).resolve()) if k in _PATH_KEYS and isinstance(v, (str, Path)) else v
            for k, v in job.items()}


def run_worker(job: dict[str, Any], job_dir: Path, tag: str, *, timeout_s: float) -> dict[str, Any]:
    """Run ``job`` (see ``_runtime_worker``) in a fresh process; its result dict (errors, a
    timeout and a crash come back as ``status`` "error" with a note, never raised)."""
    job_dir = Path(job_dir).resolve()
    job = {**_absolute(job), "result": str(job_dir / f"{tag}.result.json"),
           "check_output": str(job_dir / f"{tag}.out.npy")}
    job_path = job_dir / f"{tag}.job.json"
    job_path.write_text(json.dumps(job))
    log = job_dir / f"{tag}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(WORKER), str(job_path)],
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env=worker_env(job["threads"], job["runtime"]), cwd=job_dir)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"worker ran past {timeout_s:.0f} s", "times_ms": []}
    result_path = Path(job["result"])
    if not result_path.exists():
        tail = log.read_text()[-600:] if log.exists() else ""
        return {"status": "error", "times_ms": [],
                "note": f"worker exited with status {proc.returncode}: {tail.strip()}"}
    result = json.loads(result_path.read_text())
    out = Path(job["check_output"])
    if result.get("status") == "ok" and out.exists():
        result["output"] = np.load(out)
    return result


class _Server:
    """One worker process in serve mode (``_runtime_worker.serve``): it prepares its runtime, then
    times a block of calls each time it is asked, idle in between."""

    def __init__(self, job: dict[str, Any], job_dir: Path, tag: str) -> None:
        self.tag = tag
        job_dir = Path(job_dir).resolve()
        self.job = {**_absolute(job), "serve": True,
                    "check_output": str(job_dir / f"{tag}.out.npy")}
        job_path = job_dir / f"{tag}.job.json"
        job_path.write_text(json.dumps(self.job))
        self.log_path = job_dir / f"{tag}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(WORKER), str(job_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env=worker_env(job["threads"], job["runtime"]), cwd=job_dir)

    def reply(self, timeout_s: float) -> dict[str, Any]:
        """The worker's next answer; an error dict where it exits or does not answer in time."""
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            self.close()
            return {"status": "error", "note": f"worker ran past {timeout_s:.0f} s"}
        self.proc.wait()
        tail = self.log_path.read_text()[-600:] if self.log_path.exists() else ""
        return {"status": "error",
                "note": f"worker exited with status {self.proc.returncode}: {tail.strip()}"}

    def ask(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # (it exited: reply() says how)
        return self.reply(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def block_calls(probe_ms: float, block_s: float, *, lo: int = 2, hi: int = 30) -> int:
    """Timed calls per block: about ``block_s`` of calls of ``probe_ms``, within [lo, hi]."""
    return max(lo, min(hi, int(block_s * 1e3 / max(probe_ms, 1e-3))))


def time_interleaved(jobs: dict[str, dict[str, Any]], inputs: Tensor, *, threads: int, rounds: int,
                     warmup: int, block_s: float, max_calls: int = 30, min_calls: int = 2,
                     settle_s: float = SETTLE_S, probe: bool = True,
                     timeout_s: float = 600.0, max_rounds: int | None = None,
                     extend: Callable[[dict[str, dict[str, list[float]]]], bool] | None = None,
                     on_round: Callable[[], None] | None = None, shuffle: int | None = None,
                     workdir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Each candidate (name -> a ``_runtime_worker`` job, less inputs and threads) in a fresh
    worker process of its own, all alive at once and timed in turn: per round, each (order
    rotated) runs ``warmup`` untimed calls and a block of timed ones (:func:`block_calls` of the
    slowest candidate's probe call within [``min_calls``, ``max_calls``], the same count for all)
    while the others wait idle, and
    ``settle_s`` passes before the next block (:data:`SETTLE_S`). A busy
    spell of the machine then falls on neighbouring blocks of every candidate alike, and the
    rounds pair up: name -> ``{"rounds_ms": [block medians], "shares": [each block's CPU share
    per thread], "ms": median over every call, "output": its output on the first input, "note":
    why not}`` (``ms`` None and no rounds where its worker failed). ``inputs``: the batches the
    calls cycle through, stacked (N x batch); ``probe`` False: the first call sizes the blocks
    (no second call: long calls at larger batches). After ``rounds``, one more round at a time
    up to ``max_rounds`` while ``extend`` (given name -> ``{"rounds_ms", "shares"}`` so far)
    says so; ``on_round`` is called after each round (a progress bar). ``shuffle``: a seed, each
    round's order shuffled with it instead of rotated. Also per name: ``blocks_ms`` (each block's
    calls), ``info`` (the worker's first answer: version, precision, ``prepare_s``, ``probe_ms``),
    ``calls`` (timed calls per block). ``workdir``: the workers' files and logs (default: a
    temporary folder)."""
    out: dict[str, dict[str, Any]] = {k: {"rounds_ms": [], "shares": [], "times": [],
                                          "blocks_ms": [], "info": {}, "output": None, "note": "",
                                          "probe_ms": None}
                                      for k in jobs}
    rng = random.Random(shuffle) if shuffle is not None else None
    calls = 0
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ispc-route-")))
        work.mkdir(parents=True, exist_ok=True)
        np.save(work / "inputs.npy", inputs.detach().float().contiguous().numpy())
        servers: dict[str, _Server] = {}
        try:
            for name, job in jobs.items():  # all start together; nothing is timed until all are up
                servers[name] = _Server({**job, "inputs": str(work / "inputs.npy"),
                                         "threads": threads, "probe": probe}, work,
                                        f"w{len(servers)}")
            for name, srv in list(servers.items()):
                res = srv.reply(timeout_s)
                if res.get("status") != "ok":
                    out[name]["note"] = f"{res.get('status')}: {res.get('note')}"
                    srv.close()
                    del servers[name]
                    continue
                out[name]["probe_ms"] = res.get("probe_ms")
                out[name]["info"] = {k: v for k, v in res.items() if k not in ("status", "note")}
                path = Path(srv.job["check_output"])
                out[name]["output"] = np.load(path) if path.exists() else None
            probes = [out[k]["probe_ms"] or 0.0 for k in servers]
            calls = block_calls(max(probes, default=1.0), block_s, lo=min_calls, hi=max_calls)
            names = list(servers)
            def more(k: int) -> bool:
                if not servers or k >= max(rounds, max_rounds or 0):
                    return False
                return k < rounds or (extend is not None and extend(
                    {n: {"rounds_ms": out[n]["rounds_ms"], "shares": out[n]["shares"]}
                     for n in servers}))

            k = 0
            while more(k):
                if rng is not None:
                    order = list(names)
                    rng.shuffle(order)
                else:
                    order = names[k % len(names):] + names[:k % len(names)]
                for name in order:
                    if name not in servers:
                        continue
                    res = servers[name].ask({"warmup": warmup, "calls": calls}, timeout_s)
                    if res.get("status") != "ok" or not res.get("times_ms"):
                        out[name]["note"] = (f"{res.get('status')} in round {k + 1}: "
                                             f"{res.get('note')}")
                        servers.pop(name).close()
                        continue
                    out[name]["rounds_ms"].append(statistics.median(res["times_ms"]))
                    out[name]["shares"].append(float(res.get("cpu_share", 0.0)))
                    out[name]["times"] += res["times_ms"]
                    out[name]["blocks_ms"].append(list(res["times_ms"]))
                    time.sleep(settle_s)
                k += 1
                if on_round is not None:
                    on_round()
        finally:
            for srv in servers.values():
                srv.close()
    return {k: {"rounds_ms": v["rounds_ms"] if not v["note"] else [],
                "shares": v["shares"] if not v["note"] else [],
                "ms": statistics.median(v["times"]) if v["times"] and not v["note"] else None,
                "blocks_ms": v["blocks_ms"] if not v["note"] else [], "info": v["info"],
                "calls": calls, "output": v["output"], "note": v["note"]} for k, v in out.items()}


class DenseRuntimeModule(nn.Module):
    """The user's dense model in ``runtime`` (``"onnxruntime"``/``"openvino"``), float32, from
    ``onnx`` (its bytes, dynamic batch, the other input dimensions ``input_shape[1:]``); ``model``
    (an eval copy of the user's model) runs where the runtime cannot (module docstring).
    ``decision``: what the compile measured (for the report and the archive); ``spinning``:
    ONNX Runtime's workers spin between calls (module docstring)."""

    def __init__(self, model: nn.Module, runtime: str, onnx: bytes, input_shape: tuple[int, ...],
                 decision: dict[str, Any] | None = None, *, spinning: bool = True) -> None:
        super().__init__()
        if runtime not in PACKAGES:
            raise ValueError(f"unknown dense runtime {runtime!r}; one of {', '.join(PACKAGES)}")
        self.model = model
        self.runtime = runtime
        self.onnx = bytes(onnx)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.decision = dict(decision or {})
        self.spinning = bool(spinning)
        #: False: run ``model`` (set while measure() hooks its layers)
        self.use_runtime = True
        self._reset()

    def _reset(self) -> None:
        self.__dict__["_session"] = None  # ONNX Runtime: one session, any batch size
        self.__dict__["_binding"] = None  # its IOBinding (one call at a time: _lock)
        self.__dict__["_outputs"] = {}  # ONNX Runtime: input shape -> (output shape, dtype)
        # OpenVINO: input shape -> (request, its bound output, the shared input tensor class)
        self.__dict__["_requests"] = {}
        self.__dict__["_lock"] = threading.Lock()
        #: read per call in grad mode (walking model.parameters() costs ~1 us per layer)
        self.__dict__["_params"] = list(self.model.parameters())

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles hold no session
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_session", "_binding", "_outputs", "_requests", "_lock", "_params",
                              "as_built")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("spinning", False)  # archives from before 0.17.0 stopped it
        super().__setstate__(state)
        self._reset()

    def extra_repr(self) -> str:
        return f"runtime={self.runtime!r}, onnx={len(self.onnx)} bytes"

    def forward(self, x: Any) -> Any:
        if self._runs(x):
            return self._run(x)
        return self.model(x)

    def _runs(self, x: Any) -> bool:
        """Whether the runtime can compute this call (else ``model`` does)."""
        if not (self.use_runtime and type(x) is Tensor and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.dim() == len(self.input_shape)
                and tuple(x.shape[1:]) == self.input_shape[1:] and x.shape[0] > 0):
            return False
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        return not (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.__dict__["_params"])))

    def _run(self, x: Tensor) -> Tensor:
        """The runtime on ``x`` with nothing allocated but the output: the input handed over in
        place, the output written into torch memory (docs/dense_route.md, "session 11")."""
        a = (x.detach() if x.requires_grad else x).contiguous()
        if self.runtime == "onnxruntime":
            return self._ort_run(a)
        with self.__dict__["_lock"]:
            req, out, tensor = self.__dict__["_requests"].get(a.shape) or self._ov_request(a.shape)
            req.set_input_tensor(tensor(a.numpy(), shared_memory=True))
            # synchronous: the request computes in this thread (start_async + wait hands it to
            # OpenVINO's own and back: MobileNetV2 5-7% slower, docs/dense_route.md)
            req.infer(share_outputs=True)
            return out.clone()  # (the next call overwrites ``out``)

    def _ort_run(self, a: Tensor) -> Tensor:
        sess = self.__dict__["_session"] or self._ort_session()
        known = self.__dict__["_outputs"].get(a.shape)
        lock = self.__dict__["_lock"]
        if known is None or not lock.acquire(blocking=False):  # first of a shape, or concurrent
            res = sess.run(None, {"input": a.numpy()})[0]
            self.__dict__["_outputs"][a.shape] = (res.shape, res.dtype)
            return torch.from_numpy(res)
        try:
            shape, dtype = known
            io = self.__dict__["_binding"]
            io.bind_input("input", "cpu", 0, np.float32, a.shape, a.data_ptr())
            out = torch.from_numpy(np.empty(shape, dtype))
            io.bind_output("output", "cpu", 0, dtype, shape, out.data_ptr())
            sess.run_with_iobinding(io)
            return out
        finally:
            lock.release()

    def _ort_session(self) -> Any:
        sess = ort_session(self.onnx, torch.get_num_threads(), stop_spinning=not self.spinning)
        self.__dict__["_binding"] = sess.io_binding()
        self.__dict__["_session"] = sess
        return sess

    def _ov_request(self, shape: tuple[int, ...]) -> tuple[Any, Tensor, Any]:
        """A request for a static ``shape`` (OpenVINO's latency guide), its output bound to a
        torch tensor, and the class of the shared-memory input tensors."""
        import openvino as ov

        req = ov_compiled(self.onnx, shape, torch.get_num_threads()).create_infer_request()
        spec = req.get_output_tensor(0)
        out = np.empty(tuple(spec.shape), spec.data.dtype)
        req.set_output_tensor(ov.Tensor(out, shared_memory=True))
        slot = (req, torch.from_numpy(out), ov.Tensor)
        self.__dict__["_requests"][shape] = slot
        return slot


class RouteRunner:
    """A routed :class:`~ispc.compiled.CompiledModel`'s runner: the call straight to the runtime
    where it can compute it, else the graph. Each Python module layer between the user's call
    and the runtime cost 15-35 us per call on MobileNetV2 (an inference evicts them from the
    caches), ~2% in all (docs/dense_route.md)."""

    __slots__ = ("graph", "route")

    def __init__(self, graph: fx.GraphModule, route: DenseRuntimeModule) -> None:
        self.graph = graph
        self.route = route

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and self.route._runs(args[0]):
            return self.route._run(args[0])
        return self.graph(*args, **kwargs)


def runner_for(gm: fx.GraphModule) -> RouteRunner | None:
    """The :class:`RouteRunner` of a routed graph, or None."""
    route = routed(gm)
    return RouteRunner(gm, route) if route is not None else None


def routed(gm: nn.Module) -> DenseRuntimeModule | None:
    """The route a compiled graph runs, or None."""
    m = getattr(gm, NAME, None)
    return m if isinstance(m, DenseRuntimeModule) else None


def wrap(gm: fx.GraphModule, route: DenseRuntimeModule) -> fx.GraphModule:
    """A graph that calls ``route`` on ``gm``'s one input (named as ``gm``'s, so keyword calls
    still work) and returns what it returns."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    root = nn.Module()
    root.add_module(NAME, route)
    g = fx.Graph()
    x = g.placeholder(placeholder.target, type_expr=placeholder.type)
    g.output(g.call_module(NAME, (x,)))
    return fx.GraphModule(root, g, class_name=type(gm).__name__)


@contextlib.contextmanager
def runtime_only(gm: nn.Module, use: bool) -> Iterator[None]:
    """Within the block, every route in ``gm`` runs its runtime (``use``) or its torch model."""
    routes = [m for m in gm.modules() if isinstance(m, DenseRuntimeModule)]
    before = [m.use_runtime for m in routes]
    for m in routes:
        m.use_runtime = use
    try:
        yield
    finally:
        for m, b in zip(routes, before):
            m.use_runtime = b
