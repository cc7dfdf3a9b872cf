"""ispc on a CUDA GPU: the Triton kernel against the reference, its speed per layer and per model,
and trained CIFAR-10 checkpoints gated on the GPU.

The CUDA path (``torch.ops.ispc.gated_conv2d``'s Triton kernel) is tested on the CPU through
Triton's interpreter; this script is what checks it on a real GPU, in one short run that fits a
lent machine's time:

    python examples/gpu_check.py --json gpu.json [--sections kernel layers models cifar]
        [--checkpoints runs/a/final.pt ...] [--data ../shared/data/cifar10-jpeg.tar.gz]

- ``kernel``: random shapes, strides, paddings, dilations, both modes and saliencies; the CUDA
  operator against the masked-dense reference on the CPU, its convolution in float64 (relative
  error; the kernel reads float32 in IEEE precision, so it should sit near 1e-6).
- ``layers``: ResNet-50 and VGG-16 layer shapes at batch 1 and 32, half the channels kept (top-k):
  the Triton kernel against cuDNN's dense convolution (TF32 allowed, PyTorch's default for
  convolutions, and not) and against the masked-dense approach (mask multiply + cuDNN), medians
  of ``triton.testing.do_bench``.
- ``models``: ResNet-18/50 at batch 1 and 32 compiled on the GPU (top-k, keep 0.5), timed by
  :func:`ispc.benchmark.benchmark` against the BN-folded dense model, with and without the
  latency-aware selection (which leaves a layer dense where the kernel does not beat cuDNN); and
  the GPU-compiled model against its own copy run on the CPU (the same gates, another kernel).
- ``cifar``: each checkpoint's dense test top-1 and ispc (threshold, global) at a few keep ratios on
  the GPU, and one point again on the CPU: the two devices' top-1 should agree.

Every section records its error instead of stopping the others. Timings are the GPU's own (no
claim about any other machine); see the README's "Measured speed" for what was measured where.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import ispc
from ispc.ops import gated_conv as gc

SECTIONS = ("kernel", "layers", "models", "cifar")
DEVICE = "cuda"  #: where the checks run (tests set "cpu" to exercise the harness without a GPU)

# (name, C_in, C_out, H=W, kernel, stride): ResNet-50 and VGG-16 layers at 224x224
LAYERS = [
    ("r50 3x3 64@56", 64, 64, 56, 3, 1),
    ("r50 1x1 256->64@56", 256, 64, 56, 1, 1),
    ("r50 3x3 128@28", 128, 128, 28, 3, 1),
    ("r50 3x3 256@14", 256, 256, 14, 3, 1),
    ("r50 1x1 1024->256@14", 1024, 256, 14, 1, 1),
    ("r50 3x3 512@7", 512, 512, 7, 3, 1),
    ("vgg 3x3 64@224", 64, 64, 224, 3, 1),
    ("vgg 3x3 256@56", 256, 256, 56, 3, 1),
    ("vgg 3x3 512@28", 512, 512, 28, 3, 1),
]


#: compiles on the GPU that failed and were redone on the CPU (then moved to the GPU)
FALLBACKS: list[str] = []


def compile_on(model: torch.nn.Module, calib: list[torch.Tensor] | Any, cfg: Any) -> Any:
    """``ispc.compile`` where the model lives; if that fails, record why and compile a CPU copy
    instead, then move it back, so that the timings and accuracies still come."""
    import copy

    try:
        return ispc.compile(model, calib, config=cfg, progress=False)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding; the fallback keeps going
        FALLBACKS.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        dev = next(model.parameters()).device
        cpu_calib = [(b[0] if isinstance(b, (tuple, list)) else b).cpu() for b in calib]
        return ispc.compile(copy.deepcopy(model).cpu(), cpu_calib, config=cfg, progress=False).to(dev)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_kernel(cases: int = 48, seed: int = 0) -> dict[str, Any]:
    """The CUDA operator (Triton) against the float64 reference on the CPU, random geometry."""
    from ispc.ops import triton_gated_conv as tgc

    g = torch.Generator().manual_seed(seed)
    dev = torch.device(DEVICE)
    registered = tgc.register_cuda_kernel() if dev.type == "cuda" else False

    def pick(*options: Any) -> Any:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    rows = []
    for i in range(cases):
        n, c, cout = pick(1, 2, 5), pick(3, 16, 17, 40, 64), pick(1, 8, 31, 64)
        kk, st, dl = pick(1, 3, 5), pick(1, 2), pick(1, 2)
        pd = pick(0, kk // 2, 1)
        h, w = pick(5, 8, 13), pick(6, 9, 14)
        if (h + 2 * pd - dl * (kk - 1) - 1) < 0 or (w + 2 * pd - dl * (kk - 1) - 1) < 0:
            pd = dl * (kk - 1)
        mode = pick(gc.TOPK, gc.THRESHOLD)
        sal = pick(gc.SALIENCY_L2, gc.SALIENCY_L1)
        x = torch.randn(n, c, h, w, generator=g)
        wt = torch.randn(cout, c, kk, kk, generator=g)
        b, scale = torch.randn(cout, generator=g), torch.rand(c, generator=g) + 0.5
        k = max(1, c // 2)
        thr = float(torch.rand((), generator=g)) * 1.2
        args = (st, st, pd, pd, dl, dl, mode, thr, k, sal)
        # the selection as the operator defines it (saliency in float32), the convolution in float64
        m = gc.channel_mask(x, scale, mode, thr, k, sal).to(torch.float64)[:, :, None, None]
        ref = F.conv2d(x.double() * m, wt.double(), b.double(), st, pd, dl)
        y = torch.ops.ispc.gated_conv2d(x.to(dev), wt.to(dev), b.to(dev), scale.to(dev), *args)
        _sync(dev)
        rows.append({"shape": [n, c, h, w, cout, kk], "stride": st, "pad": pd, "dil": dl,
                     "mode": "topk" if mode == gc.TOPK else "threshold",
                     "saliency": "l2" if sal == gc.SALIENCY_L2 else "l1",
                     "finite": bool(torch.isfinite(y).all()), "rel_err": rel_err(y, ref)})
    worst = max(r["rel_err"] for r in rows)
    return {"triton_registered": registered, "cases": len(rows), "max_rel_err": worst,
            "all_finite": all(r["finite"] for r in rows), "over_1e-4": sum(r["rel_err"] > 1e-4 for r in rows),
            "rows": rows}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_layers(keep: float = 0.5) -> list[dict[str, Any]]:
    """Per-layer medians (ms): Triton gated conv vs cuDNN dense (TF32 on / off) vs masked dense."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, c, cout, hw, kk, st in LAYERS:
        for n in (1, 32):
            x = torch.randn(n, c, hw, hw, device=dev, generator=g)
            wt = torch.randn(cout, c, kk, kk, device=dev, generator=g) * 0.05
            b, scale = torch.randn(cout, device=dev, generator=g), torch.ones(c, device=dev)
            k = max(1, int(round(keep * c)))
            args = (st, st, kk // 2, kk // 2, 1, 1, gc.TOPK, 0.0, k, gc.SALIENCY_L2)

            def gated() -> Any:
                return torch.ops.ispc.gated_conv2d(x, wt, b, scale, *args)

            def dense() -> Any:
                return F.conv2d(x, wt, b, st, kk // 2)

            def masked() -> Any:
                m = gc.channel_mask(x, scale, gc.TOPK, 0.0, k, gc.SALIENCY_L2)
                return F.conv2d(x * m[:, :, None, None].to(x.dtype), wt, b, st, kk // 2)

            row = {"layer": name, "batch": n, "keep": keep, "gated_ms": _bench(gated),
                   "masked_dense_ms": _bench(masked)}
            tf32 = torch.backends.cudnn.allow_tf32
            try:
                torch.backends.cudnn.allow_tf32 = True
                row["dense_tf32_ms"] = _bench(dense)
                torch.backends.cudnn.allow_tf32 = False
                row["dense_fp32_ms"] = _bench(dense)
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            row["speedup_vs_fp32"] = row["dense_fp32_ms"] / row["gated_ms"]
            row["speedup_vs_tf32"] = row["dense_tf32_ms"] / row["gated_ms"]
            rows.append(row)
            print(f"  {name} b{n}: gated {row['gated_ms']:.3f} ms, dense fp32 {row['dense_fp32_ms']:.3f}"
                  f" / tf32 {row['dense_tf32_ms']:.3f}, masked {row['masked_dense_ms']:.3f}", flush=True)
    return rows


def time_models(models: tuple[str, ...] = ("resnet18", "resnet50"), *, size: int = 224,
                rounds: tuple[int, int] = (40, 15)) -> list[dict[str, Any]]:
    """Whole models compiled on the GPU, timed against the BN-folded dense model on the GPU."""
    from ispc.benchmark import benchmark
    from ispc.examples.models import create_model

    dev = torch.device(DEVICE)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, size, size, generator=g).to(dev) for _ in range(2)]
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = create_model(name).eval().to(dev)
        for bs in (1, 32):
            for aware in (False, True):
                cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", latency_aware=aware,
                                        latency_batch_size=bs, latency_rounds=10)
                compiled = compile_on(model, calib, cfg)
                gated = sum(1 for _ in compiled.gated_modules())
                (r,) = benchmark(model, compiled, (3, size, size), batch_sizes=(bs,),
                                 rounds=rounds[0] if bs == 1 else rounds[1], warmup=5, name=name, progress=False)
                row = {**r.to_dict(), "latency_aware": aware, "gated_layers": gated}
                if bs == 1 and not aware:  # the same gates through the CPU kernels
                    x = calib[0][:2]
                    with torch.no_grad():
                        y_gpu = compiled(x)
                        y_cpu = compiled.to("cpu")(x.cpu())
                    compiled.to(dev)
                    row["gpu_vs_cpu_rel_err"] = rel_err(y_gpu, y_cpu)
                rows.append(row)
                print(f"  {name} b{bs} latency_aware={aware}: dense {r.dense_ms:.3f} ms, gated "
                      f"{r.gated_ms:.3f} ms, realized {r.realized_speedup:.2f}x of theoretical "
                      f"{r.theoretical_speedup:.2f}x, {gated} gated layers", flush=True)
    return rows


def cifar_points(checkpoints: list[str], data_path: str,
                 keeps: tuple[float, ...] = (0.5, 0.6, 0.7)) -> list[dict[str, Any]]:
    """Dense top-1 and ispc threshold/global points of each checkpoint on the GPU; the first
    checkpoint's middle point also on the CPU (the same compiled model, the CPU kernels)."""
    from examples.cifar import _subset_loader, evaluate_top1, load_checkpoint
    from ispc.datasets import CIFAR10

    data = CIFAR10(data_path, progress=False)
    dev, cpu = torch.device(DEVICE), torch.device("cpu")
    test = _subset_loader(data, "test", None, batch_size=500, device=dev)
    calib = _subset_loader(data, "train", 2048, batch_size=500, device=dev)
    rows = []
    for i, path in enumerate(checkpoints):
        model, _ = load_checkpoint(path, device=dev)
        model.eval()
        row: dict[str, Any] = {"checkpoint": path, "dense_top1": evaluate_top1(model, test), "points": []}
        for keep in keeps:
            cfg = ispc.GatingConfig(keep_ratio=keep, mode="threshold", allocation="global")
            fast = compile_on(model, calib, cfg).eval()
            point = {"keep_ratio": keep, "top1": evaluate_top1(fast, test),
                     "mac_reduction": fast.measure(test, progress=False)["mac_reduction"]}
            if i == 0 and keep == keeps[len(keeps) // 2]:  # the first checkpoint's middle point
                point["top1_cpu"] = evaluate_top1(fast.to(cpu),
                                                  _subset_loader(data, "test", None, batch_size=500,
                                                                 device=cpu))
            row["points"].append(point)
        rows.append(row)
        print(f"  {path}: dense {100 * row['dense_top1']:.2f}%; " + "; ".join(
            f"keep {p['keep_ratio']}: {100 * p['top1']:.2f}% at {100 * p['mac_reduction']:.1f}% fewer MACs"
            + (f" (CPU {100 * p['top1_cpu']:.2f}%)" if "top1_cpu" in p else "") for p in row["points"]),
            flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--checkpoints", nargs="*", default=[], help="CIFAR checkpoints for 'cifar'")
    p.add_argument("--data", default=None, help="cifar10-jpeg.tar.gz for 'cifar'")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU; torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                              "python": platform.python_version(), "ispc": ispc.__version__}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    jobs: dict[str, Callable[[], Any]] = {
        "kernel": check_kernel, "layers": time_layers, "models": time_models,
        "cifar": lambda: cifar_points(args.checkpoints, args.data)}
    failed = False
    for name in args.sections:
        if name == "cifar" and not (args.checkpoints and args.data):
            result[name] = {"skipped": "needs --checkpoints and --data"}
            continue
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            result[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - one section's failure must not hide the others
            failed = True
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(result[name]["traceback"], file=sys.stderr, flush=True)
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        result["compile_fallbacks"] = FALLBACKS
        if args.json:  # after every section: a run stopped later still leaves what it finished
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if "kernel" in result and "max_rel_err" in result["kernel"]:
        k = result["kernel"]
        print(f"kernel: {k['cases']} random cases, max rel err {k['max_rel_err']:.2e}, "
              f"{k['over_1e-4']} over 1e-4, all finite {k['all_finite']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
