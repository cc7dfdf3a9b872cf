"""Dense peers: the user's dense model in every runtime a user could deploy, timed beside ispc.

ispc's own benchmark divides by its BatchNorm-folded PyTorch eager model; a user deploys the fastest
dense runtime they have. This module prepares and times the *dense* model in PyTorch eager (NCHW and
channels-last), ``torch.compile`` (inductor with ``freezing``), ONNX Runtime (CPU EP, all graph
optimizations) and OpenVINO (CPU, float32 and its default precision, bf16 where the CPU has AMX), and
ispc's compiled model saved with :func:`ispc.save` and loaded with :func:`ispc.load`.

How it measures (each point is what a fair comparison needs):

- every runtime runs in a fresh process of its own, started for it (their thread pools spin after a
  call and slow whoever runs next in the same process; an ONNX Runtime or OpenVINO process imports
  no PyTorch); the same intra-op threads everywhere, one inter-op thread, the same glibc malloc
  settings (``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``, the environment form of
  :func:`ispc.benchmark.retain_freed_memory`);
- ``rounds`` rounds of one process per runtime, the order rotated each round, so a slow spell of the
  machine hits every runtime; in each process ``warmup`` untimed calls, then ``calls`` timed ones
  cycling through the same distinct batches; medians and quartiles per process and over all rounds;
- or (``interleave=True``) one worker per runtime, alive for the whole run, and ``rounds`` rounds
  of short blocks of calls in turn, idle in between: a slow spell then falls on every runtime's
  neighbouring blocks, where it fell on one runtime's process;
- each worker's output on the first batch is compared with the model's own (``max_rel_err``), so a
  runtime that computes something else (bf16) shows it;
- ONNX Runtime and OpenVINO read the user's original model exported once to ONNX (dynamic batch;
  the exporter and each runtime fold BatchNorm and fuse as they do); OpenVINO fixes the batch
  (static shapes, as its latency guide advises);
- only float32 runtimes compete for "best": a bf16 figure is reported beside, named as such.

``time_runtimes`` returns :class:`RuntimeTiming` records; :func:`compare`, :func:`runtimes_table`
and :func:`runtimes_json` turn them into speed-ups, a table and JSON (``--baseline best`` picks the
fastest float32 dense runtime of the same model and batch size).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

from .compiled import CompiledModel
from .dense_route import (MMAP_THRESHOLD, export_dense_onnx, rel_err, run_worker,
                          time_interleaved)
from .errors import ConfigError, DataError
from .ops import native
from .serialization import save
from .timing import Paired, paired, retain_freed_memory

__all__ = ["Runtime", "RUNTIMES", "DENSE_RUNTIMES", "BASELINES", "RuntimeTiming", "Comparison",
           "time_runtimes", "export_dense_onnx", "runtime_available", "machine_info", "compare",
           "best_dense", "runtimes_table", "runtimes_json", "speedup_lines", "resolve_runtimes",
           "DEPLOY_ROUTES", "METHODS", "INTERLEAVE_SETTLE_S"]


@dataclass(frozen=True)
class Runtime:
    """A dense runtime: its name, a label for people, and the Python distribution it needs."""

    name: str
    label: str
    package: str  #: distribution whose presence makes it available (importlib.metadata)
    artifact: str  #: what its worker reads: "torch" (the pickled model) or "onnx"
    setup: str = ""  #: how it is configured, for the record


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("eager", "eager", "torch", "torch", "PyTorch eager, NCHW"),
    Runtime("eager_nhwc", "eager NHWC", "torch", "torch", "PyTorch eager, channels-last model "
            "and input (the conversion of the input is timed)"),
    Runtime("inductor", "inductor", "torch", "torch", "torch.compile, inductor, "
            "torch._inductor.config.freezing = True"),
    Runtime("onnxruntime", "ORT", "onnxruntime", "onnx", "ONNX Runtime, CPU execution provider, "
            "ORT_ENABLE_ALL, intra-op threads = threads, inter-op 1, sequential"),
    Runtime("openvino", "OpenVINO f32", "openvino", "onnx", "OpenVINO CPU, INFERENCE_PRECISION_HINT "
            "f32, PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = threads, static batch"),
    Runtime("openvino_default", "OpenVINO", "openvino", "onnx", "OpenVINO CPU, its default "
            "precision (bf16 on CPUs with AMX), PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = "
            "threads, static batch"),
)}
#: how to deploy the dense model in each runtime, named where ispc does not beat it
DEPLOY_ROUTES: dict[str, str] = {
    "eager": "the model as it is, in PyTorch",
    "eager_nhwc": "PyTorch with model.to(memory_format=torch.channels_last) and channels-last "
                  "inputs",
    "inductor": "torch.compile(model) with torch._inductor.config.freezing = True",
    "onnxruntime": "ONNX Runtime: ispc.runtimes.export_dense_onnx(model, x, 'model.onnx') (or "
                   "torch.onnx.export), then onnxruntime.InferenceSession('model.onnx')",
    "openvino": "OpenVINO: export to ONNX (ispc.runtimes.export_dense_onnx), then "
                "openvino.Core().compile_model('model.onnx', 'CPU', "
                "{'INFERENCE_PRECISION_HINT': 'f32'})",
}
#: every dense runtime, in table order
DENSE_RUNTIMES = tuple(RUNTIMES)
#: what ``compare(baseline=...)`` accepts
BASELINES = ("best", *DENSE_RUNTIMES)
#: the pause after each interleaved block (time_runtimes(interleave=True)): the benchmark's ONNX
#: Runtime keeps its default spinning, and its pool burned ~40 core-ms over the 100 ms after a
#: block (MobileNetV2, 2 threads; OpenVINO's nothing measurable, ispc's libgomp ~7 core-ms within
#: 10 ms); the 2 untimed calls of a block absorb what is left (docs/benchmarks.md)
INTERLEAVE_SETTLE_S = 0.1
#: how time_runtimes times (RuntimeTiming.method), for people
METHODS = {"processes": "a fresh process per runtime and round, rounds rotated",
           "interleaved": "one live worker per runtime, short blocks of calls in turn, rotated"}


@dataclass(frozen=True)
class RuntimeTiming:
    """One runtime (or one ispc model) at one batch size, over all its rounds."""

    runtime: str  #: a name of :data:`RUNTIMES`, or the ispc entry's name
    label: str
    model: str
    batch_size: int
    kind: str  #: "dense", "ispc" (loaded in a fresh process) or "ispc-in-process"
    available: bool
    note: str = ""
    precision: str = ""  #: "float32", "bfloat16", ... (as the runtime reports it)
    version: str = ""
    times_ms: tuple[float, ...] = ()  #: every timed call, rounds in order
    round_medians_ms: tuple[float, ...] = ()
    round_iqrs_ms: tuple[tuple[float, float], ...] = ()
    prepare_s: tuple[float, ...] = ()  #: per process: load, compile/session creation, first call
    #: per process: CPU seconds it got per thread per second of its timed calls; a round far
    #: below the others had its cores taken by something else. Meaningful only when the timed
    #: calls last well over a scheduler tick in all (other threads' CPU time is booked in steps)
    cpu_share: tuple[float, ...] = ()
    max_rel_err: float | None = None  #: max |out - ref| / max |ref| on the first batch
    theoretical_speedup: float | None = None  #: ispc: dense MACs / executed MACs, timed batches
    mac_reduction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: how it was timed (:data:`METHODS`): "processes", a fresh process per runtime and round
    #: (records without the field were), or "interleaved", one live worker per runtime timed in
    #: short blocks in turn (a round: one block of each; ``round_*`` fields are then per block)
    method: str = "processes"

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def iqr_ms(self) -> tuple[float, float] | None:
        return _quartiles(self.times_ms) if self.times_ms else None

    @property
    def float32(self) -> bool:
        return self.precision == "float32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["median_ms"] = self.median_ms
        d["iqr_ms"] = self.iqr_ms
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RuntimeTiming":
        """A record written by :meth:`to_dict` (e.g. read back from :func:`runtimes_json`)."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("times_ms", "round_medians_ms", "prepare_s", "cpu_share"):
            kw[key] = tuple(kw.get(key) or ())
        kw["round_iqrs_ms"] = tuple(tuple(q) for q in kw.get("round_iqrs_ms") or ())
        return cls(**kw)


def _quartiles(v: Sequence[float]) -> tuple[float, float]:
    if len(v) < 2:
        return (v[0], v[0])
    q = statistics.quantiles(v, n=4)
    return (q[0], q[2])


def runtime_available(name: str) -> tuple[bool, str]:
    """Whether the dense runtime ``name`` is installed here, and its version or what is missing.

    Asks the package metadata only (no import: importing a runtime would start its thread pool
    in this process)."""
    package = RUNTIMES[name].package
    try:
        return True, metadata.version(package)
    except metadata.PackageNotFoundError:
        return False, f"{package} is not installed (pip install 'ispc[peers]')"


def _cpu_model() -> str:
    return native.cpuinfo_field("model name") or platform.processor() or platform.machine()


def _caches() -> dict[str, str]:
    """Cache sizes of CPU 0 as sysfs writes them ("L1d": "32K", "L2": "1024K", "L3": "32768K"):
    kernels block for L2, so a figure is read beside them."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            out[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return out


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The machine and software a measurement ran on, for the JSON record."""
    flags = native.cpu_flags()
    versions = {}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["ispc"] = metadata.version("ispc")
    except metadata.PackageNotFoundError:
        versions["ispc"] = None
    versions["python"] = platform.python_version()
    return {
        "cpu": _cpu_model(), "machine": platform.machine(), "os": platform.platform(),
        "logical_cpus": os.cpu_count(), "caches": _caches(),
        "isa": {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                "avx512_bf16": "avx512_bf16" in flags,
                "amx": bool({"amx_tile", "amx_bf16"} & flags),
                "amx_bf16": "amx_bf16" in flags},
        "threads": threads if threads is not None else torch.get_num_threads(),
        "inter_op_threads": 1,
        "allocator": f"glibc: MALLOC_TRIM_THRESHOLD_={1 << 30}, "
                     f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in every worker",
        "versions": versions,
        "runtimes": {r.name: r.setup for r in RUNTIMES.values()},
    }


def _main_path(model: nn.Module) -> str | None:
    """The parent's main script, when the model's classes live in it (the worker imports it)."""
    if not any(type(m).__module__ == "__main__" for m in model.modules()):
        return None
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None)


@dataclass
class _Entry:
    """What one column of the rotation runs: a worker job or an in-process callable."""

    name: str
    label: str
    kind: str
    artifact: str | None = None
    runtime: str | None = None  #: the worker's runtime
    reference: np.ndarray | None = None
    in_process: CompiledModel | None = None
    note: str = ""
    available: bool = True
    theoretical: float | None = None
    mac_reduction: float | None = None
    precision: str = ""
    version: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _first_output(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _run_worker(entry: _Entry, job_dir: Path, inputs: Path, *, threads: int, warmup: int,
                calls: int, timeout_s: float, main_path: str | None, tag: str) -> dict[str, Any]:
    job = {"runtime": entry.runtime, "artifact": entry.artifact, "inputs": str(inputs),
           "threads": threads, "warmup": warmup, "calls": calls,
           "main_path": main_path if entry.runtime in RUNTIMES
           and RUNTIMES[entry.runtime].artifact == "torch" else None}
    result = run_worker(job, job_dir, tag, timeout_s=timeout_s)
    out = result.pop("output", None)
    if out is not None and entry.reference is not None:
        result["max_rel_err"] = rel_err(out, entry.reference)
    return result


def _time_in_process(model: nn.Module, batches: Sequence[torch.Tensor], *, threads: int,
                     warmup: int, calls: int, reference: np.ndarray | None) -> dict[str, Any]:
    """The compiled model in this (the compiling) process: part 3's comparison point."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(batches[0])
            prepare = time.perf_counter() - t0
            for i in range(warmup):
                model(batches[i % len(batches)])
            times = []
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for i in range(calls):
                x = batches[i % len(batches)]
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1e3)
            share = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9) / threads
            out = _first_output(model(batches[0])).float().contiguous().numpy()
    finally:
        torch.set_num_threads(before)
    return {"status": "ok", "times_ms": times, "prepare_s": prepare, "precision": "float32",
            "cpu_share": share,
            "version": f"torch {torch.__version__}",
            "max_rel_err": rel_err(out, reference) if reference is not None else None}


def _compiled_entries(compiled: CompiledModel | Mapping[str, CompiledModel] | None
                      ) -> dict[str, CompiledModel]:
    if compiled is None:
        return {}
    if isinstance(compiled, CompiledModel):
        return {"ispc": compiled}
    if isinstance(compiled, Mapping) and all(isinstance(v, CompiledModel) for v in compiled.values()):
        return dict(compiled)
    raise ConfigError("compiled must be an ispc.CompiledModel or a dict of them by name, got "
                      f"{type(compiled).__name__}")


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def time_runtimes(model: nn.Module, compiled: CompiledModel | Mapping[str, CompiledModel] | None,
                  batches: Sequence[torch.Tensor], *, runtimes: Iterable[str] | None = None,
                  threads: int | None = None, rounds: int = 3, calls: int = 30, warmup: int = 5,
                  in_process: bool = False, name: str | None = None,
                  onnx_path: str | Path | None = None, workdir: str | Path | None = None,
                  timeout_s: float = 600.0, progress: bool = True, interleave: bool = False,
                  settle_s: float | None = None, shuffle: int | None = None
                  ) -> list[RuntimeTiming]:
    """Time the dense ``model`` in each runtime and each compiled ispc model, every one in fresh
    processes of its own, rotated over ``rounds`` (see the module docstring).

    ``compiled``: one :class:`~ispc.compiled.CompiledModel` (named ``"ispc"``), a dict of them by
    name (e.g. one per keep ratio), or None. Each is saved with :func:`ispc.save` and timed after
    :func:`ispc.load` in its worker; ``in_process=True`` also times it in this process (as
    compiled; with the workers' malloc settings, :func:`ispc.benchmark.retain_freed_memory`), which
    shows whether the saved model keeps its speed. ``batches``: the distinct
    input batches every call cycles through (:func:`ispc.benchmark.input_batches`), all one shape.
    ``runtimes``: names from :data:`RUNTIMES` (default: all); one that is not installed comes back
    with ``available=False`` and a note. ``onnx_path``: an export of ``model`` to reuse
    (:func:`export_dense_onnx`; made here otherwise). Returns one record per runtime and ispc model.

    ``interleave=True``: one worker per runtime and ispc model, all started and warmed up first,
    then ``rounds`` rounds in which each (order rotated, or shuffled with the seed ``shuffle``)
    runs ``warmup`` untimed and ``calls`` timed calls while the others wait idle, with
    ``settle_s`` (default :data:`INTERLEAVE_SETTLE_S`) after each block for the last one's
    thread pool to stop spinning (:func:`ispc.dense_route.time_interleaved`). Blocks seconds apart
    pair up where processes minutes apart did not (a slow spell of the machine falls on one
    runtime's process); records say ``method="interleaved"``. No ``in_process`` entries then.
    """
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise DataError("batches must be a non-empty list of input tensors (see "
                        "ispc.benchmark.input_batches)")
    shape = tuple(batches[0].shape)
    if any(tuple(b.shape) != shape for b in batches):
        raise DataError("all batches must have one shape; time each batch size in its own call")
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ConfigError(f"rounds and calls must be at least 1 and warmup at least 0, got "
                          f"rounds={rounds}, calls={calls}, warmup={warmup}")
    names = list(DENSE_RUNTIMES if runtimes is None else runtimes)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime(s) {unknown}; valid: {', '.join(DENSE_RUNTIMES)}")
    if any(not t.is_cpu for t in itertools.chain(model.parameters(), model.buffers())):
        raise DataError("ispc.runtimes times CPU runtimes: move the model to the CPU first "
                        "(model.cpu())")
    if interleave and in_process:
        raise ConfigError("in_process=True times the compiled model in this process, which is "
                          "not a worker that interleave can time in blocks: pass one or the other")
    threads = threads or torch.get_num_threads()
    ispc_models = _compiled_entries(compiled)
    label = name or type(model).__name__
    batch_size = shape[0]
    batches = [b.detach().float().cpu().contiguous() for b in batches]

    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ispc-runtimes-")))
        work.mkdir(parents=True, exist_ok=True)
        inputs = work / f"inputs_b{batch_size}.npy"
        np.save(inputs, np.stack([b.numpy() for b in batches]))
        with torch.no_grad():  # the user's model is only called, never put in eval mode
            reference_model = _eval_copy(model) if model.training else model
            dense_ref = _first_output(reference_model(batches[0])).float().numpy()

        entries: list[_Entry] = []
        artifacts: dict[str, str | None] = {}
        notes: dict[str, str] = {}
        for rt in names:
            ok, info = runtime_available(rt)
            entry = _Entry(rt, RUNTIMES[rt].label, "dense", runtime=rt, reference=dense_ref,
                           available=ok, note="" if ok else info)
            kind = RUNTIMES[rt].artifact
            if ok and kind not in artifacts:
                artifacts[kind], notes[kind] = _prepare_artifact(kind, model, batches[0], work,
                                                                 onnx_path)
            if ok and artifacts.get(kind) is None:
                entry.available, entry.note = False, notes[kind]
            entry.artifact = artifacts.get(kind)
            entries.append(entry)
        for key, cm in ispc_models.items():
            param = next(cm.parameters(), None)
            with torch.no_grad():
                x0 = batches[0].to(param.device) if param is not None else batches[0]
                ref = _first_output(cm(x0)).float().cpu().numpy()
            measured = cm.measure(batches, progress=False)
            theo = measured["dense_macs"] / max(measured["executed_macs"], 1.0)
            archive = work / f"{_safe(key)}.ispc"
            entry = _Entry(key, key, "ispc", runtime="ispc", reference=ref, theoretical=theo,
                           mac_reduction=measured["mac_reduction"])
            try:
                example = batches[0][:1].expand(2, *shape[1:]).contiguous()
                save(cm, archive, example_inputs=example)
                entry.artifact = str(archive)
            except Exception as exc:  # reported, not raised: the other runtimes still run
                entry.available = False
                entry.note = f"ispc.save failed ({type(exc).__name__}: {exc})"
            entries.append(entry)
            if in_process:
                entries.append(_Entry(f"{key} in-process", f"{key} in-process",
                                      "ispc-in-process", reference=ref, in_process=cm,
                                      theoretical=theo, mac_reduction=measured["mac_reduction"]))

        runnable = [e for e in entries if e.available]
        if any(e.in_process is not None for e in runnable):
            # the workers get these malloc settings from their environment; this process too
            retain_freed_memory()
        main_path = _main_path(model)
        for e in entries:
            if not e.available:
                _say(progress, f"ispc.runtimes: {e.label}: skipped ({e.note})")
        if interleave:
            extra = _time_blocks(runnable, batches, work, threads=threads, rounds=rounds,
                                 calls=calls, warmup=warmup, settle_s=settle_s, shuffle=shuffle,
                                 timeout_s=timeout_s, main_path=main_path, progress=progress,
                                 label=label)
            return [dataclasses.replace(_finish(e, label, batch_size), method="interleaved",
                                        prepare_s=tuple(extra[e.name].pop("prepare_s", ())),
                                        extra=extra[e.name])
                    if e.name in extra else _finish(e, label, batch_size) for e in entries]
        for r in range(rounds):
            k = r % max(len(runnable), 1)
            order = runnable[k:] + runnable[:k]
            for e in order:
                tag = f"{_safe(e.name)}_b{batch_size}_r{r}"
                if e.in_process is not None:
                    res = _time_in_process(e.in_process, batches, threads=threads, warmup=warmup,
                                           calls=calls, reference=e.reference)
                else:
                    res = _run_worker(e, work, inputs, threads=threads, warmup=warmup, calls=calls,
                                      timeout_s=timeout_s, main_path=main_path, tag=tag)
                e.rounds.append(res)
                if res.get("status") == "ok":
                    t = res["times_ms"]
                    lo, hi = _quartiles(t)
                    _say(progress, f"ispc.runtimes: {label} batch {batch_size} round {r + 1}/"
                                   f"{rounds}: {e.label} {statistics.median(t):.2f} ms "
                                   f"(IQR {lo:.2f}-{hi:.2f}; prepared in "
                                   f"{res.get('prepare_s', 0.0):.1f} s)")
                else:
                    _say(progress, f"ispc.runtimes: {label} batch {batch_size} round {r + 1}/"
                                   f"{rounds}: {e.label}: {res.get('status')}: {res.get('note')}")
        return [_finish(e, label, batch_size) for e in entries]


def _time_blocks(runnable: list[_Entry], batches: Sequence[torch.Tensor], work: Path, *,
                 threads: int, rounds: int, calls: int, warmup: int, settle_s: float | None,
                 shuffle: int | None, timeout_s: float, main_path: str | None, progress: bool,
                 label: str) -> dict[str, dict[str, Any]]:
    """time_runtimes' interleaved method: every runnable entry's worker alive at once, timed in
    blocks (:func:`ispc.dense_route.time_interleaved`); each block goes into ``e.rounds`` as a
    process's result would. Returns name -> the record's ``extra`` (with ``prepare_s``)."""
    jobs = {e.name: {"runtime": e.runtime, "artifact": e.artifact,
                     "main_path": main_path if e.runtime in RUNTIMES
                     and RUNTIMES[e.runtime].artifact == "torch" else None} for e in runnable}
    settle = INTERLEAVE_SETTLE_S if settle_s is None else settle_s
    done = [0]

    def tick() -> None:
        done[0] += 1
        _say(progress, f"ispc.runtimes: {label} batch {batches[0].shape[0]}: interleaved round "
                       f"{done[0]}/{rounds}")

    res = time_interleaved(jobs, torch.stack(list(batches)), threads=threads, rounds=rounds,
                           warmup=warmup, block_s=0.0, min_calls=calls, max_calls=calls,
                           settle_s=settle, probe=batches[0].shape[0] == 1,
                           timeout_s=timeout_s, shuffle=shuffle,
                           workdir=work / "interleaved", on_round=tick)
    extra: dict[str, dict[str, Any]] = {}
    for e in runnable:
        r = res[e.name]
        if r["note"] or not r["blocks_ms"]:
            e.available, e.note = False, f"its worker failed ({r['note'] or 'no block timed'})"
            _say(progress, f"ispc.runtimes: {label}: {e.label}: {e.note}")
            extra[e.name] = {"prepare_s": []}
            continue
        info = r["info"]
        err = (rel_err(r["output"], e.reference)
               if r["output"] is not None and e.reference is not None else None)
        for i, (times, share) in enumerate(zip(r["blocks_ms"], r["shares"])):
            e.rounds.append({"status": "ok", "times_ms": times, "cpu_share": share,
                             "precision": info.get("precision", ""),
                             "version": info.get("version", ""), "max_rel_err": err})
        t = [x for b in r["blocks_ms"] for x in b]
        lo, hi = _quartiles(t)
        _say(progress, f"ispc.runtimes: {label} batch {batches[0].shape[0]}: {e.label} "
                       f"{statistics.median(t):.2f} ms (IQR {lo:.2f}-{hi:.2f}; block medians "
                       f"{min(r['rounds_ms']):.2f}-{max(r['rounds_ms']):.2f}; prepared in "
                       f"{info.get('prepare_s', 0.0):.1f} s)")
        extra[e.name] = {"blocks": len(r["blocks_ms"]), "block_calls": r["calls"],
                         "block_warmup": warmup, "settle_s": settle,
                         "order": "rotated" if shuffle is None else f"shuffled (seed {shuffle})",
                         "probe_ms": info.get("probe_ms"),
                         "prepare_s": [float(info.get("prepare_s", 0.0))]}
    return extra


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _prepare_artifact(kind: str, model: nn.Module, example: torch.Tensor, work: Path,
                      onnx_path: str | Path | None) -> tuple[str | None, str]:
    """The file a worker reads: the pickled model, or the ONNX export (None and why, on failure)."""
    try:
        if kind == "torch":
            path = work / "model.pt"
            torch.save(_eval_copy(model), path)
            return str(path), ""
        if onnx_path is not None:
            return str(onnx_path), ""
        return str(export_dense_onnx(model, example, work / "model.onnx")), ""
    except Exception as exc:
        what = "pickled for a fresh process" if kind == "torch" else "exported to ONNX"
        return None, f"the model could not be {what} ({type(exc).__name__}: {exc})"


def _finish(e: _Entry, model: str, batch_size: int) -> RuntimeTiming:
    ok = [r for r in e.rounds if r.get("status") == "ok"]
    failed = [r for r in e.rounds if r.get("status") != "ok"]
    note = e.note
    available = e.available
    if failed:
        first = failed[0]
        if first.get("status") == "unavailable" and not ok:
            available = False
        note = "; ".join(filter(None, [note, f"{len(failed)} of {len(e.rounds)} processes "
                                             f"failed: {first.get('note')}"]))
    times = tuple(t for r in ok for t in r["times_ms"])
    precision = next((r.get("precision", "") for r in ok), e.precision)
    version = next((r.get("version", "") for r in ok), e.version)
    errs = [r["max_rel_err"] for r in ok if r.get("max_rel_err") is not None]
    label = e.label
    if e.runtime == "openvino_default" and precision:
        label = f"{e.label} {_short_precision(precision)} (default)"
    if e.kind == "dense" and available and not e.note:
        note = note or ("" if precision in ("", "float32") else
                        f"{precision}: not a float32 result, not a baseline")
    return RuntimeTiming(
        runtime=e.name, label=label, model=model, batch_size=batch_size, kind=e.kind,
        available=available and bool(times), note=note, precision=precision, version=version,
        times_ms=times, round_medians_ms=tuple(statistics.median(r["times_ms"]) for r in ok),
        round_iqrs_ms=tuple(_quartiles(r["times_ms"]) for r in ok),
        prepare_s=tuple(float(r.get("prepare_s", 0.0)) for r in ok),
        cpu_share=tuple(float(r.get("cpu_share", 0.0)) for r in ok),
        max_rel_err=max(errs) if errs else None, theoretical_speedup=e.theoretical,
        mac_reduction=e.mac_reduction)


def _short_precision(p: str) -> str:
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(p, p)


# --- speed-ups, tables, JSON --------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """One ispc model against the dense runtimes of the same model and batch size."""

    model: str
    batch_size: int
    ispc: str
    ispc_ms: float
    baseline: str | None  #: the runtime divided by (None: not measured)
    baseline_ms: float | None
    speedup: float | None  #: baseline_ms / ispc_ms
    theoretical_speedup: float | None
    efficiency: float | None  #: speedup / theoretical (realized / theoretical against baseline)
    over: dict[str, float]  #: runtime -> its median / ispc's median, every runtime measured
    #: the median over rounds of (baseline's round median / ispc's round median), the baseline
    #: ("best") being the fastest float32 dense runtime of each round: rounds run every entry once,
    #: close in time, so a round that the machine slowed for everyone cancels out (None: the
    #: entries' rounds do not pair up)
    paired_speedup: float | None = None
    paired_range: tuple[float, float] | None = None  #: the lowest and highest round's ratio
    #: the median over rounds of the baseline runtime's round median (that one runtime, not the
    #: fastest of each round) over ispc's: where two dense runtimes tie, the fastest of each
    #: round is the lower of two noisy figures and reads ispc a few percent slow (MobileNetV2
    #: keep 1.0, interleaved blocks: 0.958 against 0.982)
    paired_baseline_speedup: float | None = None
    paired_baseline_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_dense(timings: Iterable[RuntimeTiming], model: str, batch_size: int
               ) -> RuntimeTiming | None:
    """The fastest float32 dense runtime measured for ``model`` at ``batch_size``."""
    dense = [t for t in timings if t.kind == "dense" and t.available and t.float32
             and t.model == model and t.batch_size == batch_size]
    return min(dense, key=lambda t: t.median_ms) if dense else None


def _paired(t: RuntimeTiming, bases: Sequence[RuntimeTiming]) -> Paired:
    """Per round, the fastest of ``bases``' round medians against ``t``'s (no ratio where any
    entry's rounds are missing or of another count)."""
    n = len(t.round_medians_ms)
    if n == 0 or not bases or any(len(b.round_medians_ms) != n for b in bases):
        return paired((), ())
    return paired([min(b.round_medians_ms[r] for b in bases) for r in range(n)],
                  t.round_medians_ms)


def compare(timings: Sequence[RuntimeTiming], *, baseline: str = "best") -> list[Comparison]:
    """Each ispc model's speed-up over every dense runtime and over ``baseline`` ("best": the
    fastest float32 one of the same model and batch size), with realized/theoretical."""
    if baseline not in BASELINES:
        raise ConfigError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    out = []
    for t in timings:
        if t.kind == "dense" or not t.available:
            continue
        peers = [d for d in timings if d.kind == "dense" and d.available and d.model == t.model
                 and d.batch_size == t.batch_size]
        base = (best_dense(timings, t.model, t.batch_size) if baseline == "best"
                else next((d for d in peers if d.runtime == baseline), None))
        speedup = base.median_ms / t.median_ms if base is not None else None
        theo = t.theoretical_speedup
        pairs = _paired(t, [d for d in peers if d.float32] if baseline == "best"
                         else [base] if base is not None else [])
        alone = _paired(t, [base] if base is not None else [])
        out.append(Comparison(
            model=t.model, batch_size=t.batch_size, ispc=t.runtime, ispc_ms=t.median_ms,
            baseline=base.runtime if base is not None else None,
            baseline_ms=base.median_ms if base is not None else None, speedup=speedup,
            theoretical_speedup=theo,
            efficiency=speedup / theo if speedup is not None and theo else None,
            over={d.runtime: d.median_ms / t.median_ms for d in peers},
            paired_speedup=pairs.median,
            paired_range=(pairs.low, pairs.high) if pairs.rounds else None,
            paired_baseline_speedup=alone.median,
            paired_baseline_range=(alone.low, alone.high) if alone.rounds else None))
    return out


def runtimes_table(timings: Sequence[RuntimeTiming], *, baseline: str = "best",
                   tablefmt: str = "github") -> str:
    """Medians (ms) for people: one row per model and batch size, one column per runtime (the
    fastest float32 dense one in bold, or starred outside Markdown), then each ispc model's
    speed-up over ``baseline`` and its realized/theoretical ratio."""
    comps = compare(timings, baseline=baseline)
    markdown = tablefmt in ("github", "pipe")
    cols: list[str] = []
    for t in timings:
        if t.runtime not in cols:
            cols.append(t.runtime)
    labels = {}
    for t in timings:
        labels.setdefault(t.runtime, t.label)
    # ratio columns for the models as deployed (loaded in a fresh process); an in-process entry
    # is a diagnostic and shows its time only
    ispc_cols = [c for c in cols if any(t.runtime == c and t.kind == "ispc" for t in timings)]
    keys: list[tuple[str, int]] = []
    for t in timings:
        if (t.model, t.batch_size) not in keys:
            keys.append((t.model, t.batch_size))
    # the method column where any record was timed otherwise than the processes of old records
    methods = any(t.method != "processes" for t in timings)
    rows = []
    for model, bs in keys:
        best = best_dense(timings, model, bs)
        row = [model, bs]
        if methods:
            row.append("/".join(sorted({t.method for t in timings
                                        if t.model == model and t.batch_size == bs})))
        for c in cols:
            t = next((x for x in timings if x.runtime == c and x.model == model
                      and x.batch_size == bs), None)
            if t is None or not t.available:
                row.append("-" if t is None else "n/a")
                continue
            cell = f"{t.median_ms:.2f}"
            if best is not None and t is best:
                cell = f"**{cell}**" if markdown else f"{cell}*"
            row.append(cell)
        for c in ispc_cols:
            comp = next((x for x in comps if x.ispc == c and x.model == model
                         and x.batch_size == bs), None)
            if comp is None or comp.speedup is None:
                row += ["-", "-"]
            else:
                row += [f"{comp.speedup:.2f}x",
                        f"{comp.efficiency:.2f}" if comp.efficiency is not None else "-"]
        rows.append(row)
    base_name = "best" if baseline == "best" else RUNTIMES[baseline].label
    headers = ["model", "batch"] + (["method"] if methods else []) + [labels[c] for c in cols]
    for c in ispc_cols:
        headers += [f"{labels[c]} vs {base_name}", f"{labels[c]} real./theor."]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def runtimes_json(timings: Sequence[RuntimeTiming], *, baseline: str = "best",
                  machine: dict[str, Any] | None = None, **extra: Any) -> str:
    """JSON for programs: the machine, every record, the comparisons, and ``extra`` fields."""
    return json.dumps({"machine": machine or machine_info(), "baseline": baseline, **extra,
                       "timings": [t.to_dict() for t in timings],
                       "comparisons": [c.to_dict() for c in compare(timings, baseline=baseline)]},
                      indent=2)


def speedup_lines(timings: Sequence[RuntimeTiming], *, baseline: str = "best") -> list[str]:
    """For people, one line per ispc model and batch size: its speed-up over ``baseline`` (the
    fastest float32 dense runtime by default), over every dense runtime measured, the MAC ratio
    and realized/theoretical; then one line per runtime that was skipped, and why."""
    labels = {t.runtime: t.label for t in timings}
    lines = []
    for c in compare(timings, baseline=baseline):
        if c.speedup is None:
            lines.append(f"{c.ispc}, {c.model} batch {c.batch_size}: {c.ispc_ms:.2f} ms; "
                         f"no dense {baseline} runtime measured to compare with")
            continue
        which = "fastest float32 dense runtime" if baseline == "best" else "dense runtime"
        each = ", ".join(f"{labels[r]} {v:.2f}x" for r, v in c.over.items())
        theo = (f"; MACs {c.theoretical_speedup:.2f}x fewer (theoretical), realized/theoretical "
                f"{c.efficiency:.2f}" if c.theoretical_speedup else "")
        by_round = (f"; paired by round {c.paired_speedup:.2f}x ({c.paired_range[0]:.2f}-"
                    f"{c.paired_range[1]:.2f}x)" if c.paired_speedup is not None else "")
        lines.append(f"{c.ispc}, {c.model} batch {c.batch_size}: {c.ispc_ms:.2f} ms, "
                     f"{c.speedup:.2f}x over the {which} ({labels[c.baseline]} "
                     f"{c.baseline_ms:.2f} ms){by_round}{theo}; over each: {each}")
        best = best_dense(timings, c.model, c.batch_size)
        if best is not None and best.median_ms <= c.ispc_ms:
            # never slower than the best dense runtime: where ispc is not faster, say which is
            dense = ("; its compile left every layer dense, no gate paid on this machine"
                     if c.theoretical_speedup is not None and c.theoretical_speedup <= 1.0 else "")
            lines.append(f"  ispc is not faster here than dense {best.label} ({c.ispc_ms:.2f} ms "
                         f"vs {best.median_ms:.2f} ms{dense}): deploy the dense model with "
                         f"{DEPLOY_ROUTES.get(best.runtime, best.label)}")
    seen = set()
    for t in timings:
        if t.kind == "dense" and not t.available and t.runtime not in seen:
            seen.add(t.runtime)
            lines.append(f"{t.label}: skipped ({t.note})")
    return lines


def resolve_runtimes(runtimes: Iterable[str] | str | None, baseline: str = "best") -> list[str]:
    """The dense runtimes to time: ``runtimes`` (names of :data:`RUNTIMES`, "all", or None/"none"
    for none) in table order, with the ``baseline`` runtime added when it names one."""
    if baseline not in BASELINES:
        raise ConfigError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    if runtimes is None or runtimes == "none":
        wanted: set[str] = set()
    elif runtimes == "all":
        wanted = set(DENSE_RUNTIMES)
    else:
        wanted = set([runtimes] if isinstance(runtimes, str) else runtimes)
        if "all" in wanted:
            wanted = set(DENSE_RUNTIMES)
        wanted.discard("none")
        unknown = sorted(wanted - set(DENSE_RUNTIMES))
        if unknown:
            raise ConfigError(f"unknown runtime(s) {unknown}; valid: all, none, "
                              f"{', '.join(DENSE_RUNTIMES)}")
    if baseline != "best":
        wanted.add(baseline)
    return [r for r in DENSE_RUNTIMES if r in wanted]
