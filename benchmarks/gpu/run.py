"""ispc on a CUDA GPU in one short run: correctness against float64, then per-layer and whole-model
speed of the Triton gated convolution against cuDNN's dense one, in the same precision.

    python benchmarks/gpu/run.py --out DIR [--sections check layers models layers16]
        [--models resnet50 vgg16_bn] [--batches 32 1] [--budget-s 330]

Sections, in the order they run (each records its error instead of stopping the others; JSON in
``DIR/gpu_results.json`` after every unit, so a run stopped by its time limit keeps what it did):

- ``check``: random geometries (1x1/3x3/5x5, strides, paddings, dilations, both gating modes and
  saliencies, NCHW and channels-last, one- and two-launch selection, with and without the fused
  residual/ReLU epilogue) in float32 IEEE, float32 TF32, bfloat16 and float16: the kernels
  against the masked-dense reference computed in float64 from the same inputs (relative error of
  the norm, per precision's tolerance; the output memory poisoned with NaN first; fresh inputs per
  case), the selection against PyTorch's, and a small gated model under CUDA graphs against
  itself run eagerly.
- ``layers`` (float32 as PyTorch runs it: TF32 unless disabled) / ``layers16`` (bfloat16):
  ResNet-50's and VGG-16's 3x3 layers at batch 32, half the channels kept (top-k): cuDNN's dense
  convolution and the gated one, each on NCHW and channels-last maps, replayed from CUDA graphs
  (medians of ``triton.testing.do_bench_cudagraph``: the same treatment for both, no launch
  overhead) and called eagerly (``do_bench``, L2 flushed before every call); the gated time split
  into selection and convolution. The speed-up is the best dense layout over the best gated one.
- ``models``: ResNet-50 and VGG-16-BN at 224x224, batch 32 and 1, 50% kept (top-k): the
  BatchNorm-folded dense model, every layer gated, and latency-aware gating
  (``GatingConfig(latency_aware=True)``: layers timed eagerly on this GPU, kept gated only where
  they pay), each replayed as a CUDA graph (:class:`ispc.backends.cuda_graphs.CUDAGraphModule`) on
  NCHW and channels-last maps; eager times beside. Random weights and inputs (no downloads on
  the GPU machine): top-k keeps k channels whatever the weights, so the work timed is the same.

``--dry-run`` runs the harness on the CPU with Triton's interpreter on tiny shapes (what the tests
do; no timing there means anything).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

SECTIONS = ("check", "layers", "models", "layers16")
MODELS = ("resnet50", "vgg16_bn")

# (name, C_in, C_out, H=W of the input, kernel, stride): the 3x3 convolutions of ResNet-50
# (bottleneck conv2, torchvision v1.5: the stride sits in the 3x3) and VGG-16 (all but the
# 3-channel first), at 224x224
LAYERS = [
    ("r50 3x3 64@56", 64, 64, 56, 3, 1),
    ("r50 3x3 128@56 s2", 128, 128, 56, 3, 2),
    ("r50 3x3 128@28", 128, 128, 28, 3, 1),
    ("r50 3x3 256@28 s2", 256, 256, 28, 3, 2),
    ("r50 3x3 256@14", 256, 256, 14, 3, 1),
    ("r50 3x3 512@14 s2", 512, 512, 14, 3, 2),
    ("r50 3x3 512@7", 512, 512, 7, 3, 1),
    ("vgg 3x3 64@224", 64, 64, 224, 3, 1),
    ("vgg 3x3 64->128@112", 64, 128, 112, 3, 1),
    ("vgg 3x3 128@112", 128, 128, 112, 3, 1),
    ("vgg 3x3 128->256@56", 128, 256, 56, 3, 1),
    ("vgg 3x3 256@56", 256, 256, 56, 3, 1),
    ("vgg 3x3 256->512@28", 256, 512, 28, 3, 1),
    ("vgg 3x3 512@28", 512, 512, 28, 3, 1),
    ("vgg 3x3 512@14", 512, 512, 14, 3, 1),
]
DRY_LAYERS = [("tiny 3x3 16@4", 16, 16, 4, 3, 1)]

#: relative error (of the norm) each precision must stay under against the float64 reference
TOLERANCE = {"fp32-ieee": 1e-5, "fp32-tf32": 2e-3, "bf16": 2e-2, "fp16": 4e-3}

#: do_bench's warm-up and measurement, in ms
WARMUP_MS, REP_MS = 10, 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out",
                   help="folder for gpu_results.json (default: $OUT, else ./gpu_out)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="ispc.examples.models names (default: resnet50 vgg16_bn)")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    p.add_argument("--layer-batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    p.add_argument("--cases", type=int, default=32, help="random geometries in 'check'")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="no new unit of work starts after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU and Triton's interpreter, tiny shapes: checks the harness only")
    args = p.parse_args(argv)
    if not 0.0 < args.keep <= 1.0:
        p.error("--keep must be in (0, 1]")
    if any(b < 1 for b in args.batches) or args.layer_batch < 1:
        p.error("batch sizes must be positive")
    return args


class Run:
    """Shared state of one run: device, clock, budget, results and where they go."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.dry = bool(args.dry_run)
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "gpu_results.json"
        self.results: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def bench(self, fn: Callable[[], Any]) -> float:
        """Median ms: ``triton.testing.do_bench`` on a GPU; on the CPU (dry run) one call."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def bench_graph(self, fn: Callable[[], Any]) -> float:
        """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``:
        no launch overhead, L2 not flushed); on the CPU, :meth:`bench`."""
        if self.device.type == "cuda":
            from triton.testing import do_bench_cudagraph

            fn()  # compile and tune outside the capture
            self.sync()
            try:
                return float(do_bench_cudagraph(fn, rep=REP_MS, return_mode="median"))
            except TypeError:  # a Triton without return_mode here
                r = do_bench_cudagraph(fn, rep=REP_MS, quantiles=[0.5])
                return float(r[0] if isinstance(r, (list, tuple)) else r)
        return self.bench(fn)


def environment(run: Run) -> dict[str, Any]:
    import torch

    import ispc
    from ispc.ops import triton_gated_conv as tgc

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "ispc": ispc.__version__, "dry_run": run.dry,
                           "float32_precision": tgc.float32_precision(),
                           "triton_registered": tgc.register_cuda_kernel()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability()),
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), cuda=torch.version.cuda,
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return env


# --- check ----------------------------------------------------------------------------------------

def _threshold_between(s, keep: float) -> float:
    """A threshold halfway between two saliencies (one on a saliency would hang the test on its
    last bit)."""
    v = s.flatten().double().sort().values
    j = min(max(int(round((1.0 - keep) * v.numel())), 1), v.numel() - 1)
    return float(v[j - 1] + v[j]) * 0.5


def _rel(y, ref) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def check(run: Run) -> dict[str, Any]:
    """The kernels against a float64 reference on random geometries (see the module doc)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    dev = run.device
    variants = [("fp32-ieee", torch.float32, "ieee"), ("fp32-tf32", torch.float32, "tf32"),
                ("bf16", torch.bfloat16, None), ("fp16", torch.float16, None)]

    rows = []
    cases = 3 if run.dry else run.args.cases
    # the default tiling: timing every tiling of every random shape would compile each of them
    tune = os.environ.get("ISPC_TRITON_TUNE")
    os.environ["ISPC_TRITON_TUNE"] = "0"
    try:
        for i in range(cases):
            rows.append(_check_case(run, i, g, variants))
    finally:
        if tune is None:
            os.environ.pop("ISPC_TRITON_TUNE", None)
        else:
            os.environ["ISPC_TRITON_TUNE"] = tune
    by = {}
    for r in rows:
        v = by.setdefault(r["variant"], {"cases": 0, "max_rel_err": 0.0, "failed": 0,
                                         "tolerance": TOLERANCE[r["variant"]]})
        v["cases"] += 1
        v["max_rel_err"] = max(v["max_rel_err"], r["rel_err"])
        v["failed"] += int(not r["ok"])
    out = {"cases": len(rows), "by_variant": by,
           "selection_mismatches": sum(not r["selection_equal"] for r in rows),
           "layout_mismatches": sum(not r["layout_kept"] for r in rows), "rows": rows}
    if dev.type == "cuda":
        out["graphs"] = _check_graphs(run)
    return out


def _check_case(run: Run, i: int, g, variants) -> dict[str, Any]:
    """One random geometry of :func:`check`."""
    import torch
    import torch.nn.functional as F

    from ispc.ops import gated_conv as gc
    from ispc.ops import triton_gated_conv as tgc

    dev = run.device

    def pick(*options: Any) -> Any:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    label, dtype, prec = variants[i % len(variants)]
    if run.dry:
        n, c, cout, kk, st, dl, h, w = 2, pick(8, 17), 16, 3, pick(1, 2), 1, 6, 5
    else:
        n, c, cout = pick(1, 2, 5), pick(3, 16, 17, 40, 64, 130), pick(1, 8, 31, 64, 96)
        kk, st, dl = pick(1, 3, 5), pick(1, 2), pick(1, 2)
        h, w = pick(5, 8, 13, 30), pick(6, 9, 14, 29)
    pd = pick(0, kk // 2, 1)
    if (h + 2 * pd - dl * (kk - 1) - 1) < 0 or (w + 2 * pd - dl * (kk - 1) - 1) < 0:
        pd = dl * (kk - 1)
    mode, sal = pick(gc.TOPK, gc.THRESHOLD), pick(gc.SALIENCY_L2, gc.SALIENCY_L1)
    layout, act = pick("nchw", "nhwc"), pick(None, "relu", "relu6")
    fused = pick(None, True, False)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    wt = (torch.randn(cout, c, kk, kk, generator=g) / math.sqrt(c * kk * kk)).to(dtype)
    b, scale = torch.randn(cout, generator=g).to(dtype), torch.rand(c, generator=g) + 0.5
    k = max(1, c // 2)
    s = gc.channel_saliency(x, scale, sal)
    thr = _threshold_between(s, 0.5) if c > 1 else 0.5 * float(s.min())
    ho = gc.conv_out_size(h, kk, st, pd, dl)
    wo = gc.conv_out_size(w, kk, st, pd, dl)
    res = torch.randn(n, cout, ho, wo, generator=g).to(dtype) if act else None
    m = gc.channel_mask(x, scale, mode, thr, k, sal).to(torch.float64)[:, :, None, None]
    ref = F.conv2d(x.double() * m, wt.double(), b.double(), st, pd, dl)
    if res is not None:
        ref = ref + res.double()
    ref = ref.clamp_min(0) if act == "relu" else ref.clamp(0, 6) if act == "relu6" else ref
    xd = x.to(dev)
    if layout == "nhwc":
        xd = xd.contiguous(memory_format=torch.channels_last)
    if dev.type == "cuda":  # poison what the caching allocator will hand the output
        torch.full((n * cout * ho * wo,), float("nan"), device=dev, dtype=dtype)
    y = tgc.gated_conv2d_cuda(xd, wt.to(dev), b.to(dev), scale.to(dev), (st, st), (pd, pd),
                              (dl, dl), mode, thr, k, sal,
                              residual=res.to(dev) if res is not None else None, act=act,
                              fused_select=fused, precision=prec)
    run.sync()
    idx, cnt = tgc.select_channels(xd, scale.to(dev), mode, thr, k, sal, fused=fused)
    want = gc.channel_mask(x, scale, mode, thr, k, sal)
    got = torch.zeros_like(want)
    for r in range(n):
        got[r, idx[r, :int(cnt[r])].long().cpu()] = True
    err = _rel(y, ref)
    return {"variant": label, "shape": [n, c, h, w, cout, kk], "stride": st, "pad": pd,
            "dil": dl, "mode": "topk" if mode == gc.TOPK else "threshold",
            "saliency": "l2" if sal == gc.SALIENCY_L2 else "l1", "layout": layout, "act": act,
            "residual": res is not None, "fused_select": fused,
            "layout_kept": bool(y.is_contiguous(memory_format=torch.channels_last)
                                if layout == "nhwc" else y.is_contiguous()),
            "finite": bool(torch.isfinite(y).all()), "rel_err": err,
            "selection_equal": bool(torch.equal(got, want)),
            "ok": bool(err < TOLERANCE[label] and torch.isfinite(y).all())}


def _tiny_net():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            y = self.a(self.stem(x))
            y = torch.relu(self.b(y) + y)
            return self.head(y.mean((2, 3)))

    return Tiny()


def _check_graphs(run: Run) -> dict[str, Any]:
    """A small gated model replayed as CUDA graphs (both layouts) against itself run eagerly."""
    import torch

    import ispc
    from ispc.backends.cuda_graphs import CUDAGraphModule

    torch.manual_seed(0)
    model = _tiny_net().eval().to(run.device)
    calib = [torch.randn(8, 3, 16, 16, device=run.device) for _ in range(2)]
    compiled = ispc.compile(model, calib, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk"),
                            progress=False)
    out = {"gated_layers": len(compiled.gated_modules())}
    x = torch.randn(4, 3, 16, 16, device=run.device)
    with torch.no_grad():
        eager = compiled(x)
        for layout in ("nchw", "nhwc"):
            g = CUDAGraphModule(compiled.graph_module, channels_last=layout == "nhwc")
            first = g(x)
            x2 = torch.randn_like(x)
            out[f"{layout}_rel_err"] = _rel(first, eager)
            out[f"{layout}_second_input_rel_err"] = _rel(g(x2), compiled(x2))
    return out


# --- layers ---------------------------------------------------------------------------------------

def layers(run: Run, dtype_name: str) -> list[dict[str, Any]]:
    """Per-layer medians: cuDNN dense vs the gated kernels, NCHW and channels-last."""
    import torch
    import torch.nn.functional as F

    from ispc.ops import gated_conv as gc
    from ispc.ops import triton_gated_conv as tgc

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    dev = run.device
    g = torch.Generator(device=dev).manual_seed(0)
    n = 2 if run.dry else run.args.layer_batch
    rows = []
    for name, c, cout, hw, kk, st in (DRY_LAYERS if run.dry else LAYERS):
        if run.over_budget():
            rows.append({"layer": name, "skipped": "time budget"})
            continue
        pad = kk // 2
        x = torch.randn(n, c, hw, hw, device=dev, generator=g).to(dtype)
        wt = (torch.randn(cout, c, kk, kk, device=dev, generator=g) / math.sqrt(c * kk * kk)).to(dtype)
        b, scale = torch.randn(cout, device=dev, generator=g).to(dtype), torch.ones(c, device=dev)
        k = max(1, int(round(run.args.keep * c)))
        xs = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last)}
        ws = {"nchw": wt, "nhwc": wt.contiguous(memory_format=torch.channels_last)}
        row: dict[str, Any] = {"layer": name, "batch": n, "dtype": dtype_name, "keep": k / c,
                               "float32_precision": tgc.float32_precision()}
        for lay in ("nchw", "nhwc"):
            xi, wi = xs[lay], ws[lay]

            def dense() -> Any:
                return F.conv2d(xi, wi, b, st, pad)

            def gated() -> Any:
                return tgc.gated_conv2d_cuda(xi, wt, b, scale, (st, st), (pad, pad), (1, 1),
                                             gc.TOPK, 0.0, k)

            for label, fn in (("dense", dense), ("gated", gated)):
                row[f"{label}_{lay}_graph_ms"] = run.bench_graph(fn)
                row[f"{label}_{lay}_ms"] = run.bench(fn)
        xi = xs["nhwc"]
        row["select_nhwc_graph_ms"] = run.bench_graph(
            lambda: tgc.select_channels(xi, scale, gc.TOPK, 0.0, k))
        idx, cnt = tgc.select_channels(xi, scale, gc.TOPK, 0.0, k)
        row["conv_nhwc_graph_ms"] = run.bench_graph(lambda: tgc.gated_conv2d_indexed(
            xi, wt, b, idx, cnt, (st, st), (pad, pad), (1, 1)))
        for sfx in ("_graph_ms", "_ms"):
            dense = min(row[f"dense_nchw{sfx}"], row[f"dense_nhwc{sfx}"])
            gated = min(row[f"gated_nchw{sfx}"], row[f"gated_nhwc{sfx}"])
            row["speedup" + sfx[:-3]] = dense / gated
        rows.append(row)
        print(f"  {name} {dtype_name} b{n} (graphs): dense {row['dense_nchw_graph_ms']:.3f}/"
              f"{row['dense_nhwc_graph_ms']:.3f} ms, gated {row['gated_nchw_graph_ms']:.3f}/"
              f"{row['gated_nhwc_graph_ms']:.3f} (NCHW/NHWC; NHWC = select "
              f"{row['select_nhwc_graph_ms']:.3f} + conv {row['conv_nhwc_graph_ms']:.3f}): "
              f"{row['speedup_graph']:.2f}x; eager {row['speedup']:.2f}x", flush=True)
        run.results[f"layers_{dtype_name}_partial"] = rows
        run.save()
    run.results.pop(f"layers_{dtype_name}_partial", None)
    return rows


# --- models ---------------------------------------------------------------------------------------

def models(run: Run) -> list[dict[str, Any]]:
    """Whole models under CUDA graphs: dense, every layer gated, latency-aware gating."""
    import torch

    import ispc
    from ispc.backends.cuda_graphs import CUDAGraphModule
    from ispc.benchmark import dense_baseline
    from ispc.examples.models import create_model

    dev = run.device
    size = 8 if run.dry else 224
    names = ["tiny"] if run.dry else run.args.models
    batches = [2] if run.dry else run.args.batches
    rows = []
    for bs in batches:  # every model at the first batch size (32) before the next
        for name in names:
            if run.over_budget():
                rows.append({"model": name, "batch": bs, "skipped": "time budget"})
                continue
            torch.manual_seed(0)
            model = (_tiny_net() if name == "tiny" else create_model(name)).eval().to(dev)
            calib = [torch.randn(8, 3, size, size, device=dev) for _ in range(2)]
            row: dict[str, Any] = {"model": name, "batch": bs, "keep": run.args.keep}
            try:
                _time_model(run, row, model, calib, bs, size, dense_baseline, CUDAGraphModule, ispc)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next unit
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                print(row["traceback"], file=sys.stderr, flush=True)
            rows.append(row)
            run.results["models"] = rows
            run.save()
            del model
            gc_collect()
    return rows


def gc_collect() -> None:
    """Free what the last unit left (its graphs' memory pools among it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time_model(run: Run, row: dict, model, calib, bs: int, size: int, dense_baseline,
                CUDAGraphModule, ispc) -> None:
    import torch

    graphs = run.device.type == "cuda"
    t = time.perf_counter()
    variants = {"dense": dense_baseline(model, calib[0][:1])}
    for label, aware in (("gated_all", False), ("gated_aware", True)):
        cfg = ispc.GatingConfig(keep_ratio=run.args.keep, mode="topk", latency_aware=aware,
                                latency_batch_size=bs)
        compiled = ispc.compile(model, calib, config=cfg, progress=False)
        variants[label] = compiled.graph_module
        s = compiled.report.summary
        row[f"{label}_layers"] = f"{s['layers_gated']}/{s['layers_total']}"
        if not aware and s.get("mac_reduction") is not None:
            row["mac_ratio"] = 1.0 / max(1e-9, 1.0 - s["mac_reduction"])
    row["compile_s"] = round(time.perf_counter() - t, 1)
    x = torch.randn(bs, 3, size, size, device=run.device)
    with torch.no_grad():
        for label, gm in variants.items():
            row[f"{label}_eager_ms"] = run.bench(lambda gm=gm: gm(x))
            if not graphs:
                continue
            for lay in ("nchw", "nhwc"):
                runner = CUDAGraphModule(gm, channels_last=lay == "nhwc", clone_outputs=False)
                row[f"{label}_graph_{lay}_ms"] = run.bench(lambda r=runner: r(x))
                if label == "gated_all" and lay == "nchw":
                    row["graph_vs_eager_rel_err"] = _rel(runner(x), gm(x))
                del runner
    key = "graph" if graphs else "eager"
    for label in ("gated_all", "gated_aware"):
        times = [row[k] for k in row if k.startswith(f"{label}_{key}")]
        dense = [row[k] for k in row if k.startswith(f"dense_{key}")]
        row[f"{label}_speedup"] = min(dense) / min(times)
    print(f"  {row['model']} b{bs}: dense {_fmt(row, 'dense', key)}, all gated "
          f"{_fmt(row, 'gated_all', key)} ({row['gated_all_speedup']:.2f}x), latency-aware "
          f"{_fmt(row, 'gated_aware', key)} ({row['gated_aware_speedup']:.2f}x, "
          f"{row['gated_aware_layers']} gated); MAC ratio {row.get('mac_ratio', float('nan')):.2f}",
          flush=True)


def _fmt(row: dict, label: str, key: str) -> str:
    return "/".join(f"{row[k]:.3f}" for k in row if k.startswith(f"{label}_{key}")) + " ms"


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("run.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks "
              "the harness on the CPU", file=sys.stderr)
        return 2
    run = Run(args)
    run.results["environment"] = environment(run)
    run.save()
    jobs: dict[str, Callable[[], Any]] = {
        "check": lambda: check(run), "layers": lambda: layers(run, "fp32"),
        "models": lambda: models(run), "layers16": lambda: layers(run, "bf16")}
    failed = False
    for name in [s for s in SECTIONS if s in args.sections]:
        if run.over_budget():
            run.results[name] = {"skipped": "time budget"}
            continue
        t = time.perf_counter()
        print(f"[{name}] at {run.elapsed():.0f} s", flush=True)
        try:
            run.results[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - one section's failure must not hide the others
            failed = True
            run.results[name] = {"error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()}
            print(run.results[name]["traceback"], file=sys.stderr, flush=True)
        run.results[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        from ispc.ops import triton_gated_conv as tgc

        run.results["tuning"] = tgc.tuning_log()
        run.save()
    summary(run.results)
    return 1 if failed else 0


def summary(results: dict[str, Any]) -> None:
    """The short table the device tool's reply shows (the end of the output)."""
    env = results.get("environment", {})
    print(f"\n{env.get('gpu', 'CPU (dry run)')}, torch {env.get('torch')}, triton "
          f"{env.get('triton')}, float32 as {env.get('float32_precision')}, "
          f"{results.get('elapsed_s')} s")
    chk = results.get("check", {})
    for v, r in (chk.get("by_variant") or {}).items():
        print(f"check {v}: {r['cases']} cases, max rel err {r['max_rel_err']:.2e} "
              f"(tol {r['tolerance']:.0e}), {r['failed']} failed")
    if "selection_mismatches" in chk:
        print(f"check: selection mismatches {chk['selection_mismatches']}, layout mismatches "
              f"{chk['layout_mismatches']}, graphs {chk.get('graphs')}")
    for sec in ("layers", "layers16"):
        for r in results.get(sec) or []:
            if isinstance(r, dict) and "speedup_graph" in r:
                print(f"{sec} {r['layer']} b{r['batch']}: {r['speedup_graph']:.2f}x under graphs "
                      f"(dense {min(r['dense_nchw_graph_ms'], r['dense_nhwc_graph_ms']):.3f}, "
                      f"gated {min(r['gated_nchw_graph_ms'], r['gated_nhwc_graph_ms']):.3f} ms), "
                      f"{r['speedup']:.2f}x eager")
    for r in results.get("models") or []:
        if isinstance(r, dict) and "gated_all_speedup" in r:
            print(f"model {r['model']} b{r['batch']}: all gated {r['gated_all_speedup']:.2f}x, "
                  f"latency-aware {r['gated_aware_speedup']:.2f}x ({r['gated_aware_layers']}), "
                  f"MAC ratio {r.get('mac_ratio', float('nan')):.2f}")
        elif isinstance(r, dict):
            print(f"model {r.get('model')} b{r.get('batch')}: {r.get('error') or r.get('skipped')}")


if __name__ == "__main__":
    sys.exit(main())
