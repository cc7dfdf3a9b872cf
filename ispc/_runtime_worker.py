"""One runtime, one fresh process: prepare the model, time it, write the result (ispc.runtimes).

Run as a script by :func:`ispc.runtimes.time_runtimes` (``python -c`` + ``runpy``, so that the
``ispc`` package is not imported where the runtime does not need it): an ONNX Runtime or OpenVINO
worker imports that runtime and NumPy only, no PyTorch, so no other thread pool is loaded beside
theirs. The job is a JSON file; the result is a JSON file plus the first batch's output (``.npy``)
for the parent's numerics check. ``job["route"]``: configure the runtime as ispc's dense route does.
Runtime ``"route"``: ``job["route_runtime"]`` run as a routed compiled model runs it (a
``CompiledModel`` around ``ispc.dense_route``'s module, its ``RouteRunner``) in a torch process;
``"ispc_built"``: a compiled model pickled by the compile (``torch.save``) with the eager
backend's runner (the dense route's compile-time timing of its candidates).
``job["serve"]``: prepare, answer one line, then time blocks of calls on request (:func:`serve`),
so that the parent can interleave several workers' blocks. Errors are results too (``status``),
never a crash of the parent.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any, Callable


def _load_numpy():
    import numpy as np

    return np


def _sessions():
    """``ispc/_runtime_sessions.py``, loaded by path: importing it as ``ispc._runtime_sessions``
    would import the ``ispc`` package, and torch with it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("_runtime_sessions.py")
    spec = importlib.util.spec_from_file_location("_ispc_runtime_sessions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _precision_name(value: Any) -> str:
    s = str(value).lower()
    if "bf16" in s or "bfloat16" in s:
        return "bfloat16"
    if "f16" in s or "float16" in s:
        return "float16"
    if "f32" in s or "float32" in s:
        return "float32"
    return s


def _import_main(path: str) -> None:
    """Make the parent's main script importable as ``__main__`` (as multiprocessing's spawn does)
    so that a model whose classes it defines unpickles here; its ``if __name__ == "__main__"``
    block does not run."""
    import runpy
    import types

    namespace = runpy.run_path(path, run_name="__mp_main__")
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _torch_model(job: dict, channels_last: bool = False):
    import torch

    torch.set_num_threads(job["threads"])
    if job.get("main_path"):
        _import_main(job["main_path"])
    try:
        model = torch.load(job["artifact"], weights_only=False)  # written by our parent, just now
    except (AttributeError, ModuleNotFoundError) as exc:
        raise RuntimeError(f"the model cannot be rebuilt in a fresh process ({exc}): define its "
                           "classes in an importable module or a script") from None
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _prepare(job: dict, batches: list) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """A one-argument call for the job's runtime, and facts about it (version, precision)."""
    runtime = job["runtime"]
    threads = job["threads"]
    if runtime in ("eager", "eager_nhwc", "inductor", "ispc", "ispc_built", "route"):
        import torch

        torch.set_num_threads(threads)
        info = {"version": torch.__version__, "precision": "float32"}
        if runtime == "route":  # the runtime behind the route's module and runner, as a user calls it
            from torch import fx, nn

            from ispc.backends import BACKENDS
            from ispc.compiled import CompiledModel
            from ispc.config import GatingConfig
            from ispc.dense_route import DenseRuntimeModule, wrap
            from ispc.report import Report

            with open(job["artifact"], "rb") as f:
                onnx = f.read()
            module = DenseRuntimeModule(nn.Identity(), job["route_runtime"], onnx,
                                        tuple(batches[0].shape),
                                        spinning=bool(job.get("spinning", True)))
            # a routed compiled model, called as a user calls one (CompiledModel -> RouteRunner)
            model = CompiledModel(wrap(fx.symbolic_trace(nn.Identity()), module), Report(),
                                  GatingConfig(), backend="eager")
            BACKENDS["eager"].attach(model, None)
            info["version"] = f"{job['route_runtime']} via ispc's dense route"
        elif runtime == "ispc_built":  # a compile's model as built, pickled by that compile
            import ispc
            from ispc.backends import BACKENDS

            model = torch.load(job["artifact"], weights_only=False)  # written by our parent
            BACKENDS["eager"].attach(model, None)  # its runner, as ispc.compile attaches it
            info["version"] = f"ispc {ispc.__version__}, torch {torch.__version__}"
        elif runtime == "ispc":
            import ispc

            model = ispc.load(job["artifact"])
            info["version"] = f"ispc {ispc.__version__}, torch {torch.__version__}"
            param = next(model.parameters(), None)
            if param is not None:
                info["precision"] = _precision_name(param.dtype)
        if runtime not in ("ispc", "ispc_built", "route"):
            model = _torch_model(job, channels_last=runtime == "eager_nhwc")
            param = next(model.parameters(), None)
            if param is not None:
                info["precision"] = _precision_name(param.dtype)
        if runtime == "inductor":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            model = torch.compile(model)
        memory_format = torch.channels_last if runtime == "eager_nhwc" else None
        # torch's own (64-byte aligned) memory, as a PyTorch caller's inputs are; np.load's
        # buffers are 16-byte aligned
        tensors = [torch.from_numpy(b).clone() for b in batches]
        mapping = {id(b): t for b, t in zip(batches, tensors)}

        def call(x):
            t = mapping[id(x)]
            if memory_format is not None:
                t = t.contiguous(memory_format=memory_format)
            with torch.no_grad():
                return model(t)

        def to_numpy(out):  # the first tensor of a tuple, list or dict (a ModelOutput's logits)
            while isinstance(out, (tuple, list, dict)):
                out = next(iter(out.values())) if isinstance(out, dict) else out[0]
            return out.detach().contiguous().numpy()

        info["to_numpy"] = to_numpy
        return call, info
    if job.get("with_torch"):  # a diagnostic: the same call in a process that runs torch too
        import torch

        torch.set_num_threads(threads)
        [torch.from_numpy(b).clone() for b in batches]
    if runtime == "onnxruntime":
        import onnxruntime as ort

        # as the route runs it (job["route"]), or with ONNX Runtime's default spinning
        sess = _sessions().ort_session(job["artifact"], threads, stop_spinning=bool(job.get("route")))
        name = sess.get_inputs()[0].name

        def call(x):
            return sess.run(None, {name: x})

        return call, {"version": ort.__version__, "precision": "float32",
                      "to_numpy": lambda out: out[0]}
    if runtime in ("openvino", "openvino_default"):
        import openvino as ov

        compiled = _sessions().ov_compiled(job["artifact"], batches[0].shape, threads,
                                           precision="f32" if runtime == "openvino" else None)
        request = compiled.create_infer_request()

        def call(x):
            request.infer({0: x})
            return request

        return call, {"version": ov.get_version(),
                      "precision": _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                      "to_numpy": lambda req: req.get_output_tensor(0).data.copy()}
    raise ValueError(f"unknown runtime {runtime!r}")


def _start(job: dict, result: dict[str, Any]) -> tuple[Any, list, Callable | None, Callable]:
    """Load the inputs, prepare the runtime, make its first call: (numpy, batches, call,
    to_numpy); ``call`` None where the runtime is not installed (``result`` says so)."""
    np = _load_numpy()
    pool = np.load(job["inputs"])
    batches = [np.ascontiguousarray(pool[i]) for i in range(pool.shape[0])]
    t0 = time.perf_counter()
    try:
        call, info = _prepare(job, batches)
    except ImportError as exc:
        result.update(status="unavailable", note=f"not installed here ({exc})")
        return np, batches, None, lambda out: out
    to_numpy = info.pop("to_numpy")
    t1 = time.perf_counter()
    result["first"] = call(batches[0])  # the first call: inductor compiles, OpenVINO/ORT allocate
    result["first_ms"] = (time.perf_counter() - t1) * 1e3
    result["prepare_s"] = time.perf_counter() - t0
    result.update(info)
    return np, batches, call, to_numpy


def _timed(call: Callable, batches: list, warmup: int, calls: int, threads: int
           ) -> tuple[list[float], float]:
    """``warmup`` untimed calls, then ``calls`` timed ones (ms), cycling the batches; and the CPU
    time this process got per thread while timed: well below what the runtime gets alone (a
    round's share far from the others') means something else took the cores."""
    n = len(batches)
    for i in range(warmup):
        call(batches[i % n])
    times = []
    perf = time.perf_counter
    cpu0, wall0 = time.process_time(), perf()
    for i in range(calls):
        x = batches[i % n]
        t = perf()
        call(x)
        times.append((perf() - t) * 1e3)
    return times, (time.process_time() - cpu0) / max(perf() - wall0, 1e-9) / threads


def run(job: dict) -> dict[str, Any]:
    """Prepare, warm up, time; the result dict (also written to ``job['result']``)."""
    result: dict[str, Any] = {"runtime": job["runtime"], "status": "ok", "times_ms": [],
                              "note": ""}
    try:
        np, batches, call, to_numpy = _start(job, result)
        result.pop("first", None)
        if call is None:
            return result
        result["times_ms"], result["cpu_share"] = _timed(call, batches, job["warmup"],
                                                         job["calls"], job["threads"])
        np.save(job["check_output"], np.asarray(to_numpy(call(batches[0])), dtype=np.float32))
    except Exception as exc:  # reported to the parent, which records it and goes on
        result.update(status="error", note=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    return result


def serve(job: dict, commands: Any, replies: Any) -> None:
    """Prepare, save the first batch's output from a second call, timed (``probe_ms``; with
    ``job["probe"]`` False the first call's output and time), and answer with the result line;
    then, per command line ``{"warmup": w, "calls": n}``, time a block of calls and answer
    ``{"status", "times_ms", "cpu_share"}``, until ``{"quit": true}`` or end of input.
    Between blocks the process waits on its input (idle: no thread of its own runs)."""
    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    result: dict[str, Any] = {"runtime": job["runtime"], "status": "ok", "note": ""}
    try:
        np, batches, call, to_numpy = _start(job, result)
        out = result.pop("first", None)
        if call is not None and job.get("probe", True):  # the second call: checked, its time
            t = time.perf_counter()                       # the probe
            out = call(batches[0])
            result["probe_ms"] = (time.perf_counter() - t) * 1e3
        elif call is not None:  # a long call: the first one is probe enough
            result["probe_ms"] = result["first_ms"]
        if call is not None:
            np.save(job["check_output"], np.asarray(to_numpy(out), dtype=np.float32))
    except Exception as exc:
        result.update(status="error", note=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    reply(result)
    if result["status"] != "ok":
        return
    for line in commands:
        cmd = json.loads(line)
        if cmd.get("quit"):
            return
        try:
            times, share = _timed(call, batches, int(cmd["warmup"]), int(cmd["calls"]),
                                  job["threads"])
            reply({"status": "ok", "times_ms": times, "cpu_share": share})
        except Exception as exc:
            reply({"status": "error", "note": f"{type(exc).__name__}: {exc}"})
            return


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        job = json.load(f)
    if job.get("serve"):
        # replies on a copy of stdout; whatever a library prints goes to stderr (the log)
        import os

        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        serve(job, sys.stdin, replies)
        return 0
    result = run(job)
    with open(job["result"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
