"""Per-layer speed of ispc's channels-last native kernels against the best dense library.

For every convolution shape of ResNet-18, ResNet-50, VGG-16 and MobileNetV2 at 224x224 (read off
the models by tracing them, with the epilogue each layer has there: ReLU, ReLU6, a residual add),
at each batch size, it times, interleaved in one process (warm-up, then rounds in a fresh random
order each, medians, IQR):

- ``onednn``: oneDNN with weights reordered once (``torch.ops.mkldnn._reorder_convolution_weight``
  then ``_convolution_pointwise``, its ``.binary`` form for a residual add), NHWC maps, epilogue
  fused: what inductor's freezing runs;
- ``dense``: ispc's dense NHWC kernel (``native.NhwcConv``, mode ``DENSE``), or for depthwise layers
  ``native.DepthwiseConv3x3``;
- ``gated``: ispc's gated NHWC kernel, top-k keeping ``--keep`` of the input channels (saliency and
  selection included), on inputs whose channels differ in scale so that the selection matters;
- ``gated_sums``: the same with the input's saliency sums handed over by the layer that wrote the
  input (``x_sums``: no pass over the input of its own), and ``dense_sums``, the dense layer
  computing its own output's sums in its epilogue (what that costs a producer: ``sums_overhead``).

and, unless ``--no-ort``, ONNX Runtime on a one-Conv model of the layer (Conv + Add + activation),
in a process of its own (thread pools of two runtimes in one process slow each other), half its
rounds just before and half just after the others' on each layer (its time includes ORT's layout
reorders at the model's edges).

efficiency = (best dense time / gated time) / (dense MACs / executed MACs): the gated kernel's
throughput per executed MAC relative to the fastest dense library on that layer (1.0: it skips
MACs for free); ``efficiency_sums`` the same for ``gated_sums`` (the producer's extra epilogue work,
``sums_overhead``, is left out of it: it is reported beside). ``--isa avx2`` builds ispc's kernels with ``-mno-avx512f`` and caps oneDNN at AVX2
(``ONEDNN_MAX_CPU_ISA``), as on the AVX2-only machines; ORT has no such cap and is left out.

Run it under ``cpulock`` (a machine-wide lock: timings taken beside other work are worthless)::

    cpulock python benchmarks/layers.py --batch 1 --json benchmarks/results/layers_b1.json
    cpulock python benchmarks/layers.py --batch 32 --isa avx2 --models resnet50 --layers '3x3'
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field

#: per-channel input scales are drawn from this range (channel saliencies then differ)
SCALE_RANGE = (0.1, 2.0)
#: a layer whose candidates' IQR exceeds this fraction of their median is timed again (something
#: else ran meanwhile), at most RETRIES times; the least spread attempt is kept
MAX_SPREAD, RETRIES = 0.25, 2


@dataclass
class Layer:
    """One convolution shape and its epilogue, with the model layers that have it."""

    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    groups: int
    hw: int  #: input height = width
    act: str  #: "relu", "relu6" or "none"
    residual: bool
    uses: list[str] = field(default_factory=list)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def name(self) -> str:
        kind = "dw " if self.depthwise else ""
        epi = self.act + ("+add" if self.residual else "")
        return (f"{kind}{self.cin}->{self.cout} {self.kernel}x{self.kernel}/{self.stride} "
                f"@{self.hw} {epi}")

    def macs(self, batch: int) -> int:
        per_out = self.kernel * self.kernel * (1 if self.depthwise else self.cin)
        return batch * self.out_hw * self.out_hw * self.cout * per_out

    def key(self) -> tuple:
        return (self.cin, self.cout, self.kernel, self.stride, self.padding, self.groups, self.hw,
                self.act, self.residual)


#: names layers.py took before it took peers.py's
MODEL_ALIASES = {"mobilenetv2": "mobilenet_v2", "vgg16_bn": "vgg16"}


def model_layers(names: list[str]) -> list[Layer]:
    """The convolutions of the named models, deduplicated by shape and epilogue, in model order."""
    import operator

    import torch
    from torch import fx, nn
    from torch.fx.passes.shape_prop import ShapeProp

    from ispc.examples.models import mobilenet_v2, resnet18, resnet50, vgg16

    makers = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16,
              "mobilenet_v2": mobilenet_v2}
    found: dict[tuple, Layer] = {}
    for name in names:
        name = MODEL_ALIASES.get(name, name)
        if name not in makers:
            raise SystemExit(f"layers.py: unknown model {name!r}; choose from {', '.join(makers)}")
        model = makers[name]().eval()
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(torch.randn(1, 3, 224, 224))
        mods = dict(gm.named_modules())

        def kind(node) -> str:
            if node.op == "call_module":
                m = mods[node.target]
                return {nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.ReLU6: "relu6"}.get(type(m), "")
            if node.op == "call_function":
                if node.target in (torch.relu, torch.nn.functional.relu):
                    return "relu"
                if node.target is torch.nn.functional.relu6:
                    return "relu6"
                if node.target in (operator.add, operator.iadd, torch.add):
                    return "add"
            return ""

        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d):
                continue
            conv = mods[node.target]
            act, residual, cur = "none", False, node
            while len(cur.users) == 1:  # conv -> bn -> (add) -> act
                nxt = next(iter(cur.users))
                k = kind(nxt)
                if k == "bn":
                    cur = nxt
                elif k == "add" and not residual:
                    # the add fuses into the later of its two inputs' convolutions; the earlier
                    # one's output is that one's residual (no epilogue of its own)
                    other = [a for a in nxt.args if a is not cur]
                    if other and hasattr(other[0], "op") and order[other[0]] > order[cur]:
                        break
                    residual, cur = True, nxt
                elif k in ("relu", "relu6"):
                    act = k
                    break
                else:
                    break
            shape = node.args[0].meta["tensor_meta"].shape
            layer = Layer(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                          conv.padding[0], conv.groups, int(shape[-1]), act, residual)
            layer = found.setdefault(layer.key(), layer)
            layer.uses.append(f"{name}.{node.target}")
    return list(found.values())


def cpu_record() -> dict:
    """The machine, for the results' record: CPU model, ISA flags that matter here, threads."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile") if f in flags]
    return {"cpu": model, "isa_flags": isa, "machine": platform.machine()}


# ---- ONNX Runtime, in a worker process of its own -------------------------------------------


def ort_model(layer: Layer, batch: int, rng):
    """The layer as a one-Conv ONNX model (Conv, then Add of a residual input, then the
    activation) and its inputs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    cpg = layer.cin // layer.groups
    w = rng.standard_normal((layer.cout, cpg, layer.kernel, layer.kernel), dtype=np.float32)
    b = rng.standard_normal(layer.cout, dtype=np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y0"], group=layer.groups,
                              kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2,
                              pads=[layer.padding] * 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                            [batch, layer.cin, layer.hw, layer.hw])]
    cur, ho = "y0", layer.out_hw
    if layer.residual:
        nodes.append(helper.make_node("Add", [cur, "r"], ["y1"]))
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, layer.cout, ho, ho]))
        cur = "y1"
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if layer.act == "relu":
        nodes.append(helper.make_node("Relu", [cur], ["y"]))
    elif layer.act == "relu6":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [cur, "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "layer", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    feeds = {"x": np.maximum(rng.standard_normal((batch, layer.cin, layer.hw, layer.hw),
                                                 dtype=np.float32), 0)}
    if layer.residual:
        feeds["r"] = rng.standard_normal((batch, layer.cout, ho, ho), dtype=np.float32)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


def ort_worker() -> int:
    """Serve timing requests, one JSON line each on stdin: {"layer", "batch", "threads", "warmup"
    (a new layer: build and warm up its session), "rounds"} -> {"times_ms"} on stdout."""
    import time

    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    sess = feeds = key = None
    print(json.dumps({"version": ort.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if (req["batch"], req["layer"]) != key:
            key = (req["batch"], req["layer"])
            model, feeds = ort_model(Layer(**req["layer"]), req["batch"], rng)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = req["threads"]
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            for _ in range(req["warmup"]):
                sess.run(None, feeds)
        times = []
        for _ in range(req["rounds"]):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"times_ms": times}), flush=True)
    return 0


class OrtWorker:
    """ONNX Runtime in a process of its own, timing a layer when asked: called before and after
    the in-process candidates of each layer, so that its samples and theirs come from the same
    minutes (the two processes never compute at once; a pause before each switch lets the
    other's spinning threads go to sleep)."""

    PAUSE_S = 0.05

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.proc = subprocess.Popen([sys.executable, __file__, "--ort-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        if not first:
            err = self.proc.stderr.read().strip().splitlines()[-1:]
            raise RuntimeError(f"ONNX Runtime worker failed: {err}")
        self.version = json.loads(first)["version"]

    def time(self, layer: Layer, batch: int, warmup: int, rounds: int) -> list[float]:
        import time

        time.sleep(self.PAUSE_S)
        self.proc.stdin.write(json.dumps({"layer": asdict(layer), "batch": batch, "threads": self.threads,
                                          "warmup": warmup, "rounds": rounds}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ONNX Runtime worker died: {self.proc.stderr.read()[-500:]}")
        time.sleep(self.PAUSE_S)
        return json.loads(line)["times_ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- the in-process candidates ---------------------------------------------------------------


def candidates(layer: Layer, batch: int, keep: float):
    """{name: zero-argument call} for one layer and batch, and the executed MAC fraction of
    ``gated``."""
    import torch

    from ispc.ops import gated_conv as gc
    from ispc.ops import native

    g = torch.Generator().manual_seed(layer.cin * 131 + layer.cout)
    scale = torch.empty(1, layer.cin, 1, 1).uniform_(*SCALE_RANGE, generator=g)
    x = (torch.randn(batch, layer.cin, layer.hw, layer.hw, generator=g).relu() * scale)
    x = x.contiguous(memory_format=torch.channels_last)
    cpg = layer.cin // layer.groups
    w = torch.randn(layer.cout, cpg, layer.kernel, layer.kernel, generator=g) * (2.0 / (cpg * layer.kernel ** 2)) ** 0.5
    b = torch.randn(layer.cout, generator=g) * 0.1
    ho = layer.out_hw
    res = (torch.randn(batch, layer.cout, ho, ho, generator=g).contiguous(memory_format=torch.channels_last)
           if layer.residual else None)
    p, s = [layer.padding] * 2, [layer.stride] * 2
    wr = torch.ops.mkldnn._reorder_convolution_weight(w, p, s, [1, 1], layer.groups, list(x.shape))
    attr, scalars = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
                     "none": ("none", [])}[layer.act]
    clamp = {"relu": native.RELU, "relu6": native.RELU6, "none": native.NO_CLAMP}[layer.act]
    if res is None:
        def onednn():
            return torch.ops.mkldnn._convolution_pointwise(x, wr, b, p, s, [1, 1], layer.groups, attr,
                                                           scalars, "")
    else:
        unary = None if layer.act == "none" else attr

        def onednn():
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, res, wr, b, p, s, [1, 1], layer.groups, "add", 1.0, unary, scalars, None)
    cands = {"onednn": onednn}
    ref = onednn()
    if layer.depthwise or layer.cin <= 3:  # a stem on the image is never gated
        if layer.depthwise:
            dense = native.DepthwiseConv3x3(w, b, layer.stride, layer.padding)
            cands["dense"] = lambda: dense(x, residual=res, clamp=clamp)
        else:
            dense = native.NhwcConv(w, b, layer.stride, layer.padding, 1, out_hw=ho * ho)
            cands["dense"] = lambda: dense(x, native.DENSE, residual=res, clamp=clamp)
        checks = [cands["dense"]()]
        frac = None
    else:
        conv = native.NhwcConv(w, b, layer.stride, layer.padding, 1, out_hw=ho * ho)
        k = max(1, round(keep * layer.cin))
        ones = torch.ones(layer.cin)
        cands["dense"] = lambda: conv(x, native.DENSE, residual=res, clamp=clamp)
        cands["gated"] = lambda: conv(x, gc.TOPK, scale=ones, k=k, residual=res, clamp=clamp)
        # the input's saliency sums from the layer that wrote it: no selection pass here; and
        # what computing the output's sums in the epilogue costs a producer (on this layer)
        x_sums = (x * x).sum((2, 3)).contiguous()
        y_sums = torch.empty(batch, layer.cout)
        cands["gated_sums"] = lambda: conv(x, gc.TOPK, scale=ones, k=k, residual=res, clamp=clamp,
                                           x_sums=x_sums)
        cands["dense_sums"] = lambda: conv(x, native.DENSE, residual=res, clamp=clamp,
                                           out_sums=y_sums)
        checks = [cands["dense"]()]
        frac = k / layer.cin
        # the gated output against the masked-dense reference (a wrong kernel must not be timed)
        m = gc.channel_mask(x, ones, gc.TOPK, 0.0, k)
        gref = torch.nn.functional.conv2d(x * m[:, :, None, None], w, b, layer.stride, layer.padding)
        if res is not None:
            gref = gref + res
        gref = gref.clamp(*clamp)
        err = float((cands["gated"]() - gref).abs().max() / gref.abs().max().clamp_min(1e-12))
        if err > 1e-4:
            raise AssertionError(f"{layer.name}: gated output off the reference by {err:.2e}")
    for out in checks:
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if err > 1e-4:
            raise AssertionError(f"{layer.name}: ispc's dense output off oneDNN's by {err:.2e}")
    return cands, frac


def with_variants(cands: dict, variants: dict) -> dict:
    """cands plus, per variant build, its ``dense``/``gated`` run with that library swapped in."""
    from ispc.ops import native

    def swapped(lib, fn):
        def call():
            base, native._lib = native._lib, lib
            try:
                return fn()
            finally:
                native._lib = base
        return call
    out = dict(cands)
    for flags, lib in variants.items():
        for name in ("dense", "gated", "gated_sums"):
            if name in cands:
                out[f"{name}[{flags}]"] = swapped(lib, cands[name])
    return out


def busy_fraction(seconds: float = 1.0) -> float:
    """The fraction of the machine's CPU time others used over ``seconds`` (from /proc/stat; 0.0
    where it cannot be read): a benchmark taken while something else computes is worthless."""
    import time

    def read():
        with open("/proc/stat") as fh:
            v = [int(u) for u in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait
    try:
        a = read()
        time.sleep(seconds)
        b = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (b[1] - a[1]) / max(b[0] - a[0], 1)


def time_shuffled(cands: dict, *, warmup: int, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Per-call times (ms) of each zero-argument call: ``warmup`` calls each, then ``rounds``
    rounds, each calling every candidate once in a fresh random order. (A fixed rotation gives each
    candidate the same predecessor every round, whose cache footprint then favours or hurts it:
    an A/B of two builds of one kernel, each following a different neighbour, read 5-15% apart
    in favour of whichever was listed second.)"""
    import random
    import time

    rng = random.Random(seed)
    names = list(cands)
    for name in names:
        for _ in range(warmup):
            cands[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            cands[name]()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def stats(times: list[float]) -> dict:
    import statistics

    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "n": len(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50,vgg16,mobilenet_v2",
                   help="comma-separated, the names benchmarks/peers.py takes")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--keep", type=float, default=0.5, help="kept fraction of input channels (top-k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: ispc built with -mno-avx512f, oneDNN capped at AVX2, no ORT")
    p.add_argument("--layers", default="", help="regex: time only layers whose name matches")
    p.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    p.add_argument("--variant", action="append", default=[],
                   help="A/B: also time ispc built with these extra flags (tuning -D settings that "
                        "keep the packed layout), interleaved; repeatable")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--ort-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ort_worker:
        return ort_worker()
    if args.isa == "avx2" and (os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2"
                               or "-mno-avx512f" not in os.environ.get("ISPC_NATIVE_FLAGS", "")):
        # both read at load time: start again with them set
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2",
               "ISPC_NATIVE_FLAGS": (os.environ.get("ISPC_NATIVE_FLAGS", "") + " -mno-avx512f").strip()}
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode

    import torch
    from tabulate import tabulate

    from ispc.benchmark import retain_freed_memory
    from ispc.ops import native

    if not native.available():
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    allocator = retain_freed_memory()
    busy_start = busy_fraction()
    if busy_start > 0.1:
        print(f"warning: the CPUs were {busy_start:.0%} busy before the start: something else is "
              "computing (timings will be off; run under cpulock when the machine is quiet)",
              file=sys.stderr)
    layers = [lay for lay in model_layers(args.models.split(","))
              if re.search(args.layers, lay.name)]
    variants = {v: native._build(tuple(os.environ.get("ISPC_NATIVE_FLAGS", "").split() + v.split()))
                for v in args.variant}
    ort = None
    if not args.no_ort and args.isa == "native" and not variants:
        try:
            ort = OrtWorker(args.threads)
        except (RuntimeError, OSError) as exc:
            print(f"ONNX Runtime left out: {exc}", file=sys.stderr)
    results = []
    for batch in args.batch:
        rounds = args.rounds if batch == 1 else max(5, args.rounds // 3)
        rows = []
        for layer in layers:
            cands, frac = candidates(layer, batch, args.keep)
            cands = with_variants(cands, variants)
            warmup = args.warmup if batch == 1 else 2
            best_try = None
            for attempt in range(1 + RETRIES):  # a layer timed while something else ran: again
                ort_times = ort.time(layer, batch, warmup, (rounds + 1) // 2) if ort else []
                with torch.no_grad():
                    t = time_shuffled(cands, warmup=warmup, rounds=rounds, seed=attempt)
                times = {name: stats(v) for name, v in t.items()}
                if ort:
                    ort_times += ort.time(layer, batch, 0, rounds // 2)
                    times["ort"] = stats(ort_times)
                spread = max((v["p75"] - v["p25"]) / v["median"] for v in times.values())
                if best_try is None or spread < best_try[0]:
                    best_try = (spread, times, attempt + 1)
                if spread <= MAX_SPREAD:
                    break
            _, times, attempts = best_try
            best = min(("onednn", "ort"), key=lambda n: times[n]["median"] if n in times else 1e30)
            d = times[best]["median"]
            rec = {"layer": layer.name, "uses": layer.uses, "batch": batch, "attempts": attempts,
                   **asdict(layer),
                   "macs_dense": layer.macs(batch), "times_ms": times, "best_dense": best,
                   "dense_vs_best": d / times["dense"]["median"],
                   "dense_vs_onednn": times["onednn"]["median"] / times["dense"]["median"]}
            if frac is not None:
                rec["macs_executed"] = round(layer.macs(batch) * frac)
                rec["efficiency"] = d / times["gated"]["median"] * frac
                rec["efficiency_sums"] = d / times["gated_sums"]["median"] * frac
                rec["sums_overhead"] = times["dense_sums"]["median"] / times["dense"]["median"] - 1
            results.append(rec)

            def fmt(n):
                if n not in times:
                    return "-"
                tm = times[n]
                return f"{tm['median']:.3f} ({tm['p25']:.3f}-{tm['p75']:.3f})"
            rows.append([layer.name, len(layer.uses), fmt("onednn"), fmt("ort"), fmt("dense"),
                         f"{rec['dense_vs_best']:.2f}", fmt("gated"),
                         f"{rec['efficiency']:.2f}" if frac is not None else "-",
                         f"{rec['efficiency_sums']:.2f}" if frac is not None else "-",
                         f"{rec['sums_overhead']:+.1%}" if frac is not None else "-"])
            for v in variants:  # A/B: each variant's time relative to the default build's
                rows[-1] += [f"{times[n]['median'] / times[b]['median']:.3f}"
                             if (n := f"{b}[{v}]") in times else "-" for b in ("dense", "gated")]
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        print(f"\nbatch {batch}, {args.threads} threads, ISA {args.isa}, keep {args.keep} (top-k); "
              "ms: median (IQR)")
        print(tabulate(rows, headers=["layer", "uses", "oneDNN", "ORT", "ispc dense", "dense vs best",
                                      f"ispc {args.keep:.0%}", "efficiency",
                                      "efficiency, sums given", "sums overhead",
                                      *(f"{b} {v} / default" for v in variants
                                        for b in ("dense", "gated"))],
                       tablefmt="github", disable_numparse=True))
    meta = {**cpu_record(), "isa_build": args.isa,
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(none)"),
            "ispc_native_flags": os.environ.get("ISPC_NATIVE_FLAGS", ""),
            "torch": torch.__version__, "ort": ort.version if ort else None, "threads": args.threads,
            "keep": args.keep, "allocator": allocator,
            "cpu_busy_before": busy_start, "cpu_busy_after": busy_fraction(), "rounds": args.rounds, "warmup": args.warmup,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "note": "oneDNN and ispc interleaved in one process; ORT in a process of its own, half its"
                    " rounds just before and half just after the others' on each layer (its time"
                    " includes its layout reorders at the model's edges)"}
    for key in ("efficiency", "efficiency_sums"):
        effs = [r[key] for r in results if key in r]
        if effs:
            meta[f"{key}_min"] = min(effs)
            meta[f"{key}_below_0.8"] = sum(e < 0.8 for e in effs)
    if ort:
        ort.close()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
