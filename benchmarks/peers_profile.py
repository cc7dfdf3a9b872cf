"""Where the time goes: ONNX Runtime's own per-node profile against ispc's, by category (issue 26).

For each model at batch 1 (random weights, 224x224), the dense ONNX export in ONNX Runtime and
ispc's saved model (topk, keep 0.5, latency-aware; the archive ``benchmarks/peers.py
--compiled-dir`` leaves, or compiled here) each run in a fresh process of their own, in turn, for
``--rounds`` rounds.

Method (both sides measure wall-clock time on the calling thread, per node, inside whole runs):

- ONNX Runtime: ``SessionOptions.enable_profiling``; every ``Node`` event's duration (its kernel,
  threads included), grouped by run through the ``model_run`` events; the executor's own time is
  ``model_run`` minus its nodes, and Python's ``sess.run`` binding the wall time minus ``model_run``.
- ispc: the loaded model's FX graph with a ``perf_counter_ns`` read inserted between every two
  nodes (~0.1 us each), so a node's time is everything from the end of the previous node to its
  end: its Python call, its module's forward, its kernel. What is left of the call (entering the
  compiled model, pytree flattening of inputs and outputs) is "outside nodes".
- Convolutions are matched by their weight's name: ONNX initializer ``layer1.0.conv1.weight`` <->
  ispc module ``layer1.0.conv1``; in both runtimes a convolution counts as *gated* when ispc gates
  it, so the two "gated conv" rows cover the same layers. Fused epilogues (residual add, ReLU) sit
  inside the convolution that absorbed them, in both runtimes.
- Medians per node over the runs; per category the sum of its nodes' medians; "whole" is the median
  wall time of the same profiled runs, and each side also times unprofiled calls in the same
  process, to show what the profiling itself costs.

    python benchmarks/peers_profile.py --models resnet18 resnet50 mobilenet_v2 \\
        --compiled-dir /tmp/peers-cache --onnx-dir /tmp/peers-cache --json profile.json

``--runtime openvino``: OpenVINO's per-node profile (f32, LATENCY hint, the same threads, static
batch 1, compiled with ``PERF_COUNT``; each executed node's ``real_time`` per call, medians over
the runs) beside ispc's native program op by op in situ (``program_ops.op_rows`` on the archive,
as deployed: the program's own per-op timer), one table row per ispc op with the OpenVINO nodes of
the same layers summed (OpenVINO's node names are the ONNX export's, whose Conv nodes read the
torch module's ``<module>.weight``; fused Clamp/Add nodes do not run), then per block (e.g.
``features.5``). Name the archive's keep ratio with ``--keep-ratio`` (1.0: the dense program)::

    python benchmarks/peers_profile.py --runtime openvino --models mobilenet_v2 --keep-ratio 1.0 \\
        --compiled-dir D --onnx-dir D --rounds 3 --runs 200 --json ov-layers.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORIES = ("gated conv", "ungated conv: stem", "ungated conv: depthwise", "ungated conv: other",
              "pooling", "adds/activations", "layout/copies", "classifier", "other ops",
              "runtime overhead outside ops")
_MARKS: list[int] = []


# --- workers (fresh processes) ------------------------------------------------------------------

def _tick() -> None:
    _MARKS.append(time.perf_counter_ns())


def worker_ort(args: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime as ort

    def options(profile: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(args.out).with_suffix("")) + "_ort"
        return so

    g = np.random.default_rng(1)
    xs = [g.standard_normal((1, 3, args.size, args.size), dtype=np.float32) for _ in range(4)]

    def timed(sess) -> list[float]:
        name = sess.get_inputs()[0].name
        wall = []
        for i in range(args.warmup + args.runs):
            t = time.perf_counter()
            sess.run(None, {name: xs[i % 4]})
            wall.append((time.perf_counter() - t) * 1e3)
        return wall[args.warmup:]

    # unprofiled first, its session (and thread pool) gone before the profiled one starts
    plain = ort.InferenceSession(args.onnx, options(False), providers=["CPUExecutionProvider"])
    unprofiled = timed(plain)
    del plain
    gc.collect()
    sess = ort.InferenceSession(args.onnx, options(True), providers=["CPUExecutionProvider"])
    wall = timed(sess)
    prof = sess.end_profiling()
    del sess
    events = json.loads(Path(prof).read_text())
    Path(prof).unlink()
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"])
    per_run = []
    for r in runs[args.warmup:]:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        inside = [{"name": e["name"].removesuffix("_kernel_time"), "op": e["args"].get("op_name"),
                   "ms": e["dur"] / 1e3,
                   "shapes": e["args"].get("input_type_shape")}
                  for e in nodes if lo <= e["ts"] <= hi]
        per_run.append({"model_run_ms": r["dur"] / 1e3, "nodes": inside})
    return {"runtime": "onnxruntime", "version": ort.__version__, "wall_ms": wall,
            "unprofiled_ms": unprofiled, "runs": per_run}


def _node_record(gm, node) -> dict:
    """What a graph node is, for the categories."""
    from torch import nn

    rec = {"node": node.name, "op": node.op}
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        rec["target"] = node.target
        rec["module"] = type(mod).__name__
        if isinstance(mod, nn.Conv2d) or type(mod).__name__ == "GatedConv2d":
            rec["conv"] = {"in": int(getattr(mod, "in_channels", mod.weight.shape[1])),
                           "groups": int(getattr(mod, "groups", 1)),
                           "kernel": list(mod.weight.shape[2:])}
        if type(mod).__name__ == "GatedConv2d":
            orient = ("pix", "co", "full", "cl")[int(getattr(mod, "orient", 0))]
            rec["kernel_choice"] = (f"native:{orient}" if mod.strategy == "native"
                                    else mod.strategy)
            rec["k"] = int(mod.k)
    else:
        rec["target"] = getattr(node.target, "__name__", str(node.target))
        if hasattr(node.target, "_schema"):
            rec["target"] = str(node.target._schema.name) + "." + node.target._overloadname
    return rec


def worker_ispc(args: argparse.Namespace) -> dict:
    import torch

    import ispc

    from torch import fx

    torch.set_num_threads(args.threads)
    model = ispc.load(args.archive)
    gm = model.graph_module
    # the instrumented graph is a second GraphModule over the same submodules (no weights
    # copied), so instrumented and plain calls can alternate, and drift hits both alike
    graph = fx.Graph()
    env: dict = {}
    ops, records = [], []
    for n in gm.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method"):
            graph.call_function(_tick)
            ops.append(n)
            records.append(_node_record(gm, n))
        if n.op == "output":
            graph.call_function(_tick)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph._codegen = gm.graph._codegen
    instrumented = ispc.CompiledModel(fx.GraphModule(gm, graph), model.report, model.config)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, args.size, args.size, generator=g) for _ in range(4)]
    unprofiled, wall, per_run = [], [], []
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            t = time.perf_counter_ns()
            model(xs[i % 4])
            t1 = time.perf_counter_ns()
            _MARKS.clear()
            instrumented(xs[i % 4])
            t2 = time.perf_counter_ns()
            if i < args.warmup:
                continue
            if len(_MARKS) != len(ops) + 1:
                raise RuntimeError(f"{len(_MARKS)} marks for {len(ops)} nodes")
            unprofiled.append((t1 - t) / 1e6)
            # _MARKS[0] is taken right before the first node: what precedes it is outside
            wall.append((t2 - t1) / 1e6)
            per_run.append({"model_run_ms": (_MARKS[-1] - _MARKS[0]) / 1e6,
                            "nodes": [(_MARKS[j + 1] - _MARKS[j]) / 1e6
                                      for j in range(len(ops))]})
    return {"runtime": "ispc", "version": ispc.__version__, "wall_ms": wall,
            "unprofiled_ms": unprofiled, "records": records, "runs": per_run}


def worker_ov(args: argparse.Namespace) -> dict:
    """OpenVINO f32 as ``benchmarks/peers.py`` runs it (``ispc._runtime_sessions.ov_compiled``'s
    settings), then again compiled with ``PERF_COUNT``: per call, every executed node's real time
    (ms), type and primitive. Neither ispc nor torch is imported here: as in peers.py's workers,
    OpenVINO runs alone in its process."""
    import numpy as np
    import openvino as ov

    def compiled_model(**extra):
        core = ov.Core()
        read = core.read_model(args.onnx)
        read.reshape({read.inputs[0].get_any_name(): ov.PartialShape([1, 3, args.size,
                                                                      args.size])})
        return core.compile_model(read, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads,
            "INFERENCE_PRECISION_HINT": "f32", **extra})

    g = np.random.default_rng(1)
    xs = [g.standard_normal((1, 3, args.size, args.size), dtype=np.float32) for _ in range(4)]

    def timed(req, profile: bool) -> tuple[list[float], list[dict]]:
        wall, runs = [], []
        for i in range(args.warmup + args.runs):
            t = time.perf_counter()
            req.infer({0: xs[i % 4]})
            wall.append((time.perf_counter() - t) * 1e3)
            if profile and i >= args.warmup:
                runs.append({q.node_name: [q.real_time.total_seconds() * 1e3, q.node_type,
                                           q.exec_type]
                             for q in req.get_profiling_info()
                             if q.status == q.Status.EXECUTED})
        return wall[args.warmup:], runs

    plain = compiled_model()
    unprofiled, _ = timed(plain.create_infer_request(), False)
    del plain
    gc.collect()
    wall, runs = timed(compiled_model(PERF_COUNT="YES").create_infer_request(), True)
    return {"runtime": "openvino", "version": ov.get_version(), "wall_ms": wall,
            "unprofiled_ms": unprofiled, "runs": runs}


def worker_ispc_ops(args: argparse.Namespace) -> dict:
    """ispc's archive as deployed, each op of its native program timed in situ
    (``program_ops.op_rows``: medians over the runs of this process)."""
    import torch

    import ispc
    from ispc.benchmark import retain_freed_memory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from program_ops import op_rows

    torch.set_num_threads(args.threads)
    retain_freed_memory()
    model = ispc.load(args.archive)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(args.warmup):
            model(x)
    rows, totals = op_rows(model, x, runs=args.runs)
    return {"runtime": "ispc", "version": ispc.__version__, "rows": rows, **totals}


# --- categories ---------------------------------------------------------------------------------

def conv_kind(in_channels: int, groups: int) -> str:
    if in_channels <= 4:
        return "ungated conv: stem"
    if groups > 1 and groups == in_channels:
        return "ungated conv: depthwise"
    return "ungated conv: other"


ISPC_POOL = {"ChannelsLastMaxPool2d", "StridedMaxPool2d", "MaxPool2d", "AdaptiveAvgPool2d",
             "AvgPool2d"}
ISPC_ACT = {"ReLU", "ReLU6", "Hardtanh"}


def ispc_category(rec: dict, gated: set[str]) -> str:
    if rec["op"] == "call_module":
        m = rec["module"]
        if m == "GatedConv2d":
            return "gated conv"
        if "conv" in rec:
            c = rec["conv"]
            return conv_kind(c["in"], c["groups"])
        if m in ISPC_POOL:
            return "pooling"
        if m in ISPC_ACT:
            return "adds/activations"
        if m == "ToMemoryFormat":
            return "layout/copies"
        if m in ("Linear", "Flatten", "Dropout"):
            return "classifier"
        return "other ops"
    t = rec["target"]
    base = t.split("::")[-1].split(".")[0]
    if base in ("max_pool2d", "adaptive_avg_pool2d", "avg_pool2d", "mean"):
        return "pooling"
    if base in ("add", "add_", "relu", "relu_", "hardtanh", "hardtanh_", "relu6", "clamp",
                "clamp_", "iadd"):
        return "adds/activations"
    if base in ("contiguous", "clone", "_to_copy", "to", "permute"):
        return "layout/copies"
    if base in ("linear", "flatten", "view", "reshape", "dropout", "addmm"):
        return "classifier"
    return "other ops"


def ort_conv_names(onnx_path: str) -> dict[str, str]:
    """ORT node name stems -> the module of the convolution they compute (from the export:
    a Conv's output, and the ReLU/Clip that directly consumes it, name the fused node)."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = {}
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        module = n.input[1].removesuffix(".weight")
        names[n.name] = module
        out = n.output[0]
        names[out] = module
        users = consumers.get(out, [])
        while len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            out = users[0].output[0]
            names[out] = module
            users = consumers.get(out, [])
    return names


ORT_POOL = {"MaxPool", "GlobalAveragePool", "AveragePool", "ReduceMean", "GlobalMaxPool"}
ORT_ACT = {"Add", "Sum", "Relu", "Clip", "Mul", "HardSigmoid"}
ORT_LAYOUT = {"ReorderInput", "ReorderOutput", "Transpose", "Identity"}
ORT_CLASSIFIER = {"Gemm", "MatMul", "Flatten", "Reshape", "Squeeze"}


def ort_category(ev: dict, conv_names: dict[str, str], gated: set[str]) -> tuple[str, str | None]:
    op = ev["op"]
    if op in ("Conv", "FusedConv"):
        stem = ev["name"].removesuffix("_nchwc")
        module = conv_names.get(stem)
        if module in gated:
            return "gated conv", module
        shapes = ev.get("shapes") or []
        cin = next(iter(shapes[0].values()))[1] if shapes else 0
        w = next(iter(shapes[1].values())) if len(shapes) > 1 else [0, cin]
        groups = cin // w[1] if w[1] else 1
        return conv_kind(cin, groups), module
    if op in ORT_POOL:
        return "pooling", None
    if op in ORT_ACT:
        return "adds/activations", None
    if op in ORT_LAYOUT:
        return "layout/copies", None
    if op in ORT_CLASSIFIER:
        return "classifier", None
    return "other ops", None


def kernel_of(ev: dict) -> str:
    shapes = ev.get("shapes") or []
    if len(shapes) > 1:
        w = next(iter(shapes[1].values()))
        if len(w) == 4:
            return f"{w[2]}x{w[3]}"
    return "?"


def med(v: list[float]) -> float:
    return statistics.median(v) if v else 0.0


def analyse_ort(results: list[dict], onnx_path: str, gated: set[str]) -> dict:
    conv_names = ort_conv_names(onnx_path)
    runs = [r for res in results for r in res["runs"]]
    per_node: dict[str, list[float]] = {}
    meta: dict[str, tuple[str, str | None, str]] = {}
    for r in runs:
        for ev in r["nodes"]:
            per_node.setdefault(ev["name"], []).append(ev["ms"])
            if ev["name"] not in meta:
                cat, module = ort_category(ev, conv_names, gated)
                meta[ev["name"]] = (cat, module, ev["op"])
    cats = dict.fromkeys(CATEGORIES, 0.0)
    layers, unmatched, by_kernel = {}, [], {}
    kernels = {name: kernel_of(ev) for r in runs for ev in r["nodes"]
               for name in [ev["name"]]}
    for name, times in per_node.items():
        cat, module, op = meta[name]
        cats[cat] += med(times)
        if cat == "gated conv":
            k = kernels.get(name, "?")
            by_kernel[k] = by_kernel.get(k, 0.0) + med(times)
        if op in ("Conv", "FusedConv"):
            if module is None:
                unmatched.append(name)
            else:
                layers[module] = layers.get(module, 0.0) + med(times)
    node_sums = [sum(ev["ms"] for ev in r["nodes"]) for r in runs]
    model_run = [r["model_run_ms"] for r in runs]
    executor = med([m - s for m, s in zip(model_run, node_sums)])
    wall = [w for res in results for w in res["wall_ms"]]
    binding = med([w - m for w, m in zip(wall, model_run)])
    cats["runtime overhead outside ops"] = executor + binding
    return {"categories": cats, "gated_by_kernel": by_kernel, "layers": layers,
            "unmatched_convs": unmatched,
            "whole_ms": med(wall), "nodes_sum_ms": sum(med(t) for t in per_node.values()),
            "executor_overhead_ms": executor, "python_binding_ms": binding,
            "unprofiled_ms": med([w for res in results for w in res["unprofiled_ms"]]),
            "nodes": len(per_node),
            "ops": sorted({m[2] for m in meta.values()})}


def analyse_ispc(results: list[dict]) -> dict:
    records = results[0]["records"]
    gated = {r["target"] for r in records if r.get("module") == "GatedConv2d"}
    runs = [r for res in results for r in res["runs"]]
    cats = dict.fromkeys(CATEGORIES, 0.0)
    layers, by_kernel, kernels = {}, {}, {}
    per_node = [med([r["nodes"][j] for r in runs]) for j in range(len(records))]
    for rec, t in zip(records, per_node):
        cat = ispc_category(rec, gated)
        cats[cat] += t
        if cat == "gated conv":
            k = "x".join(map(str, rec["conv"]["kernel"]))
            by_kernel[k] = by_kernel.get(k, 0.0) + t
        if "conv" in rec:
            layers[rec["target"]] = t
            kernels[rec["target"]] = rec.get("kernel_choice", "dense")
    wall = [w for res in results for w in res["wall_ms"]]
    inside = [r["model_run_ms"] for r in runs]
    outside = med([w - m for w, m in zip(wall, inside)])
    # between-node time is inside the nodes' intervals: a node runs from the previous mark
    cats["runtime overhead outside ops"] = outside
    return {"categories": cats, "gated_by_kernel": by_kernel, "layers": layers,
            "layer_kernels": kernels, "gated": sorted(gated), "whole_ms": med(wall),
            "nodes_sum_ms": sum(per_node), "outside_nodes_ms": outside,
            "unprofiled_ms": med([w for res in results for w in res["unprofiled_ms"]]),
            "nodes": len(records),
            "node_detail": [{**rec, "category": ispc_category(rec, gated), "ms": t}
                            for rec, t in zip(records, per_node)]}


def ov_layer_names(onnx_path: str) -> dict[str, str]:
    """ONNX node and output names -> the torch module whose weight the node reads (Conv, Gemm,
    MatMul): OpenVINO names its nodes by either."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = {}
    for n in model.graph.node:
        weight = next((i for i in n.input[1:] if i in inits and i.endswith(".weight")), None)
        if n.op_type in ("Conv", "Gemm", "MatMul") and weight:
            names[n.name] = weight.removesuffix(".weight")
            for o in n.output:
                names[o] = names[n.name]
    return names


OV_POOL = {"ReduceMean", "Pooling", "AvgPool", "MaxPool", "AdaptivePooling"}
OV_LAYOUT = {"Reorder", "Transpose", "Reshape", "Convert"}


def ov_key(name: str, node_type: str, layers: dict[str, str]) -> str:
    """The layer an OpenVINO node belongs to: its module, or "pool" / "layout" / "other"."""
    if name in layers:
        return layers[name]
    if node_type in OV_POOL:
        return "pool"
    if node_type in OV_LAYOUT:
        return "layout"
    return "other"


def block_of(layer: str) -> str:
    """``features.5.conv.0.0`` -> ``features.5``, ``classifier.1`` -> ``classifier.1``: the
    module path up to and with its first index."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return layer


def ispc_keys(row: dict) -> list[str]:
    """The OpenVINO keys an ispc op row covers: its layers, and "pool" / "layout" where it pools
    or changes the layout."""
    keys = []
    for layer, mod in zip(row["layers"].split("+"), row["modules"].split("+")):
        if mod == "ToMemoryFormat":
            keys.append("layout")
        elif "Pool" in mod or "pool" in layer:
            keys.append("pool")
        else:
            keys.append(layer)
    return keys


def analyse_ov_vs_ops(ov_results: list[dict], ops_results: list[dict], onnx_path: str) -> dict:
    """One row per ispc op (medians over the processes of each op's in-situ median) beside the
    OpenVINO nodes of the same layers (the sum of each node's median over all profiled calls);
    then per block; OpenVINO nodes no op covers are listed."""
    layers = ov_layer_names(onnx_path)
    modules = set(layers.values())
    runs = [r for res in ov_results for r in res["runs"]]
    per_node: dict[str, list[float]] = {}
    meta: dict[str, tuple[str, str, str]] = {}
    for r in runs:
        for name, (ms, node_type, exec_type) in r.items():
            per_node.setdefault(name, []).append(ms)
            meta.setdefault(name, (ov_key(name, node_type, layers), node_type, exec_type))
    ov_by_key: dict[str, float] = {}
    ov_nodes: dict[str, list[str]] = {}
    for name, times in per_node.items():
        key = meta[name][0]
        ov_by_key[key] = ov_by_key.get(key, 0.0) + med(times)
        ov_nodes.setdefault(key, []).append(f"{meta[name][1]}:{meta[name][2]}")
    n_ops = len(ops_results[0]["rows"])
    rows, covered = [], set()
    for j in range(n_ops):
        row = ops_results[0]["rows"][j]
        keys = ispc_keys(row)
        covered.update(keys)
        ov_ms = sum(ov_by_key.get(k, 0.0) for k in dict.fromkeys(keys))
        ispc_ms = med([res["rows"][j]["ms"] for res in ops_results])
        rows.append({"op": row["layers"], "ispc_ms": ispc_ms, "openvino_ms": ov_ms,
                     "openvino_nodes": [n for k in dict.fromkeys(keys) for n in ov_nodes.get(k, [])],
                     "block": block_of(next((k for k in keys if k in modules), keys[0]))})
    blocks: dict[str, dict[str, float]] = {}
    for r in rows:
        b = blocks.setdefault(r["block"], {"ispc_ms": 0.0, "openvino_ms": 0.0})
        b["ispc_ms"] += r["ispc_ms"]
        b["openvino_ms"] += r["openvino_ms"]
    uncovered = {k: v for k, v in ov_by_key.items() if k not in covered}
    ov_wall = [w for res in ov_results for w in res["wall_ms"]]
    return {"ops": rows, "blocks": blocks, "openvino_uncovered_ms": uncovered,
            "openvino": {"whole_ms": med(ov_wall), "nodes_sum_ms": sum(ov_by_key.values()),
                         "unprofiled_ms": med([w for res in ov_results
                                               for w in res["unprofiled_ms"]]),
                         "version": ov_results[0]["version"]},
            "ispc": {"whole_ms": med([res["whole_ms"] for res in ops_results]),
                     "ops_sum_ms": sum(r["ispc_ms"] for r in rows)}}


def ov_table(name: str, res: dict) -> str:
    from tabulate import tabulate

    def line(label, i, o):
        return [label, f"{o:.3f}", f"{i:.3f}", f"{i - o:+.3f}", f"{i / o:.2f}" if o else ""]

    rows = [line(r["op"], r["ispc_ms"], r["openvino_ms"]) for r in res["ops"]]
    blocks = [line(b, v["ispc_ms"], v["openvino_ms"]) for b, v in res["blocks"].items()]
    o, i = res["openvino"], res["ispc"]
    blocks.append(line("nodes / ops summed", i["ops_sum_ms"], o["nodes_sum_ms"]))
    blocks.append(line("whole (OpenVINO profiled; ispc in situ)", i["whole_ms"], o["whole_ms"]))
    blocks.append(["whole (OpenVINO unprofiled, same process)", f"{o['unprofiled_ms']:.3f}", "",
                   "", ""])
    head = ["ispc op (its layers)", "OpenVINO ms", "ispc ms", "ispc - OV", "ispc / OV"]
    out = (f"{name}, batch 1, OpenVINO {o['version']} per node against ispc's ops in situ:\n"
           + tabulate(rows, headers=head, tablefmt="github") + "\n\nper block:\n"
           + tabulate(blocks, headers=["block"] + head[1:], tablefmt="github"))
    if res["openvino_uncovered_ms"]:
        out += ("\n(OpenVINO nodes no ispc op covers, ms: "
                + ", ".join(f"{k} {v:.3f}" for k, v in res["openvino_uncovered_ms"].items()) + ")")
    return out


# --- driver -------------------------------------------------------------------------------------

def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_artifacts(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """The dense ONNX export and ispc's archive (keep 0.5, latency-aware at batch 1) for ``name``,
    made here when an earlier ``benchmarks/peers.py --compiled-dir`` run left none."""
    import torch

    import ispc
    from ispc.examples.models import create_model
    from ispc.runtimes import export_dense_onnx

    onnx_path = Path(args.onnx_dir) / f"{name}.onnx"
    archive = Path(args.compiled_dir) / f"{name}-b1-k{args.keep_ratio}.ispc"
    if onnx_path.exists() and archive.exists():
        return str(onnx_path), str(archive)
    torch.manual_seed(args.seed)
    model = create_model(name).eval()
    g = torch.Generator().manual_seed(args.seed)
    calib = [torch.randn(8, 3, args.size, args.size, generator=g) for _ in range(4)]
    if not onnx_path.exists():
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_dense_onnx(model, calib[0][:2], onnx_path)
    if not archive.exists():
        say(f"profile: {name}: compiling ispc (keep {args.keep_ratio}, latency-aware, batch 1)")
        cfg = ispc.GatingConfig(keep_ratio=args.keep_ratio, mode="topk", latency_aware=True,
                                latency_batch_size=1, latency_rounds=15, dense_route="off")
        archive.parent.mkdir(parents=True, exist_ok=True)
        ispc.save(ispc.compile(model, calib, config=cfg), archive)
    return str(onnx_path), str(archive)


def run_worker(kind: str, args: argparse.Namespace, onnx_path: str, archive: str,
               out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--onnx", onnx_path, "--archive", archive,
           "--out", str(out), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--size", str(args.size)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads),
           "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(name: str, ort: dict, isp: dict) -> str:
    from tabulate import tabulate

    rows = []
    for c in CATEGORIES:
        a, b = ort["categories"][c], isp["categories"][c]
        if a == 0 and b == 0:
            continue
        rows.append([c, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"])
        if c == "gated conv":
            for k in sorted(set(ort["gated_by_kernel"]) | set(isp["gated_by_kernel"])):
                a, b = ort["gated_by_kernel"].get(k, 0.0), isp["gated_by_kernel"].get(k, 0.0)
                rows.append([f"  of which {k}", f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"])
    rows.append(["whole (profiled runs)", f"{ort['whole_ms']:.2f}", f"{isp['whole_ms']:.2f}",
                 f"{isp['whole_ms'] - ort['whole_ms']:+.2f}"])
    rows.append(["whole (unprofiled, same process)", f"{ort['unprofiled_ms']:.2f}",
                 f"{isp['unprofiled_ms']:.2f}", f"{isp['unprofiled_ms'] - ort['unprofiled_ms']:+.2f}"])
    return f"{name}, batch 1:\n" + tabulate(rows, headers=["category", "ORT ms", "ispc ms",
                                                            "ispc - ORT"], tablefmt="github")


def layer_table(ort: dict, isp: dict, gated: set[str], top: int) -> str:
    from tabulate import tabulate

    names = [n for n in isp["layers"] if n in ort["layers"]]
    rows = sorted(([n, isp["layer_kernels"].get(n, "dense"), f"{ort['layers'][n]:.3f}",
                    f"{isp['layers'][n]:.3f}", isp["layers"][n] - ort["layers"][n]]
                   for n in names), key=lambda r: -abs(r[4]))
    rows = [r[:4] + [f"{r[4]:+.3f}"] for r in rows[:top]]
    return tabulate(rows, headers=["conv layer", "ispc", "ORT ms", "ispc ms", "ispc - ORT"],
                    tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--compiled-dir", default="peers-cache")
    p.add_argument("--onnx-dir", default="peers-cache")
    p.add_argument("--rounds", type=int, default=2, help="processes per runtime, alternating")
    p.add_argument("--runs", type=int, default=30, help="profiled runs per process")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-layers", type=int, default=12)
    p.add_argument("--json")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="onnxruntime: categories and conv layers against ispc's graph nodes; "
                        "openvino: per node against ispc's native program op by op")
    p.add_argument("--worker", choices=["ort", "ispc", "ov", "ispc_ops"], help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--archive", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = {"ort": worker_ort, "ispc": worker_ispc, "ov": worker_ov,
               "ispc_ops": worker_ispc_ops}[args.worker](args)
        Path(args.out).write_text(json.dumps(res))
        return 0
    report = {"config": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="ispc-profile-") as tmp:
        for name in args.models:
            onnx_path, archive = ensure_artifacts(name, args)
            kinds = ("ort", "ispc") if args.runtime == "onnxruntime" else ("ov", "ispc_ops")
            got = {k: [] for k in kinds}
            for r in range(args.rounds):
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    say(f"profile: {name}: {kind} round {r + 1}/{args.rounds}")
                    got[kind].append(run_worker(kind, args, onnx_path, archive,
                                                Path(tmp) / f"{name}-{kind}-{r}.json"))
            if args.runtime == "openvino":
                if not got["ispc_ops"][0]["rows"]:
                    raise SystemExit(f"{archive}: no native program ran (a dense route?)")
                res = analyse_ov_vs_ops(got["ov"], got["ispc_ops"], onnx_path)
                report["models"][name] = res
                print(ov_table(name, res) + "\n")
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))
                continue
            isp = analyse_ispc(got["ispc"])
            ort = analyse_ort(got["ort"], onnx_path, set(isp["gated"]))
            report["models"][name] = {"onnxruntime": ort, "ispc": isp,
                                      "ort_version": got["ort"][0]["version"]}
            print(table(name, ort, isp))
            print()
            print(layer_table(ort, isp, set(isp["gated"]), args.top_layers))
            if ort["unmatched_convs"]:
                print(f"(ORT convolutions not matched to a layer: {ort['unmatched_convs']})")
            print(f"ORT: {ort['nodes']} nodes ({', '.join(ort['ops'])}); executor overhead "
                  f"{ort['executor_overhead_ms']:.2f} ms, Python binding "
                  f"{ort['python_binding_ms']:.2f} ms. ispc: {isp['nodes']} graph nodes, "
                  f"{len(isp['gated'])} gated; outside nodes {isp['outside_nodes_ms']:.2f} ms.\n")
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
