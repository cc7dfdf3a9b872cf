"""Each channels-last convolution of a model timed in situ against the same call alone (issue 26).

``benchmarks/layers.py`` times every layer shape alone, back to back, so its weights and input
stay in cache between calls; inside a whole model they do not (ResNet-50 reads ~100 MB of
weights per call, at batch 1 each layer's once). This script runs the model, records the time of
every ``NhwcConv`` call (the native kernel and its Python call) inside the whole runs, captures
each call's inputs (map, scale, residual, saliency sums: the same kept channels), and replays
each call alone, in the same process:

- ``insitu``: median over the whole-model runs;
- ``warm``: the captured call repeated back to back (what layers.py measures);
- ``cold``: the captured call after writing ``--flush-mb`` MB of other memory before each call
  (weights, maps, page-table entries out of the caches).

``insitu / warm`` is the loss to the memory hierarchy; ``cold / warm`` is how much of it evicted
caches reproduce. Models are saved archives (``--saved``, e.g. what ``benchmarks/peers.py
--compiled-dir`` leaves) or compiled here (``--models``: topk, ``--keep``, latency-aware at the batch
size, or not and channels-last: ``--no-latency-aware``). Run it under ``cpulock``::

    cpulock python benchmarks/insitu.py --saved peers-cache/resnet50-b1-k0.5.ispc --json insitu.json
    cpulock python benchmarks/insitu.py --models resnet18 --batch-size 32 --runs 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tabulate import tabulate

import ispc
from ispc.benchmark import retain_freed_memory
from ispc.examples.models import create_model
from ispc.ops import native


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone(memory_format=torch.channels_last) if v.dim() == 4 else v.clone()
    return v


def layer_rows(model, x: torch.Tensor, *, runs: int, flush_mb: int) -> list[dict]:
    """Per NhwcConv call of one forward pass of ``model`` on ``x``: in-situ, warm and cold medians
    (ms), in call order."""
    names = {}
    for name, mod in model.named_modules():
        for attr in ("_nhwc", "_kernel"):  # gated layers' and dense layers' kernels
            nh = getattr(mod, attr, None)
            if isinstance(nh, native.NhwcConv):
                names[id(nh)] = name
    orig = native.NhwcConv.run
    calls: list[tuple] = []  # (layer, args, kwargs) of the captured pass
    times: list[list[float]] = []
    state = {"capture": False, "i": 0}

    def run(self, *args, **kwargs):
        if state["capture"]:
            calls.append((self, tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}))
            times.append([])
        t = time.perf_counter_ns()
        out = orig(self, *args, **kwargs)
        i = state["i"]
        if not state["capture"] and i < len(times):
            times[i].append((time.perf_counter_ns() - t) / 1e6)
        state["i"] = i + 1
        return out

    native.NhwcConv.run = run
    # layer by layer: a compiled model's eager runner runs its layers in one native call, past run()
    fwd = getattr(model, "graph_module", model)
    try:
        with torch.no_grad():
            for _ in range(3):
                fwd(x)
            state.update(capture=True, i=0)
            fwd(x)
            state["capture"] = False
            for _ in range(runs):
                state["i"] = 0
                fwd(x)
    finally:
        native.NhwcConv.run = orig
    flush = torch.empty(max(flush_mb, 1) << 18)  # floats

    def median_of(fn, before=None) -> float:
        ts = []
        for _ in range(runs):
            if before is not None:
                before()
            t = time.perf_counter_ns()
            fn()
            ts.append((time.perf_counter_ns() - t) / 1e6)
        return statistics.median(ts)

    rows = []
    with torch.no_grad():
        for (nh, args, kwargs), ts in zip(calls, times):
            def call(nh=nh, args=args, kwargs=kwargs):
                return orig(nh, *args, **kwargs)
            call()
            warm = median_of(call)
            cold = median_of(call, lambda: flush.add_(1.0))
            xs = args[0]
            rows.append({"layer": names.get(id(nh), "?"), "cin": nh.cin, "cout": nh.cout,
                         "kernel": nh.kernel[0], "stride": nh.stride[0], "hw": int(xs.shape[-1]),
                         "gated": args[1] != native.DENSE, "weight_mb": nh.packed.numel() * 4 / 1e6,
                         "insitu_ms": statistics.median(ts) if ts else float("nan"),
                         "warm_ms": warm, "cold_ms": cold})
    return rows


def model_result(label: str, model, x: torch.Tensor, *, runs: int, flush_mb: int) -> dict:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        whole = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            whole.append((time.perf_counter() - t) * 1e3)
    rows = layer_rows(model, x, runs=runs, flush_mb=flush_mb)
    tot = {k: sum(r[k] for r in rows) for k in ("insitu_ms", "warm_ms", "cold_ms")}
    return {"model": label, "batch": int(x.shape[0]), "whole_ms": statistics.median(whole),
            "totals": tot, "layers": rows}


def _print(res: dict) -> None:
    t = res["totals"]
    print(f"{res['model']} batch {res['batch']}: whole {res['whole_ms']:.2f} ms; NhwcConv calls in "
          f"situ {t['insitu_ms']:.2f} ms, alone warm {t['warm_ms']:.2f}, alone cold "
          f"{t['cold_ms']:.2f} (in situ / warm {t['insitu_ms'] / max(t['warm_ms'], 1e-9):.2f})")
    table = [[r["layer"], f"{r['cin']}->{r['cout']} {r['kernel']}x{r['kernel']}/{r['stride']} "
              f"@{r['hw']}", "gated" if r["gated"] else "dense", r["weight_mb"], r["insitu_ms"],
              r["warm_ms"], r["cold_ms"], r["insitu_ms"] / max(r["warm_ms"], 1e-9)]
             for r in res["layers"]]
    print(tabulate(table, headers=["layer", "shape", "", "weights MB", "in situ ms", "warm ms",
                                   "cold ms", "in situ / warm"], floatfmt=".3f",
                   tablefmt="github"), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saved", nargs="+", default=[], help="saved ispc archives (ispc.save)")
    p.add_argument("--models", nargs="+", default=[], help="models to compile here")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="compile --models latency-aware at the batch size (what peers.py runs)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--flush-mb", type=int, default=256, help="memory written before a cold call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not (args.saved or args.models):
        p.error("give --saved archives or --models")
    if not native.available():
        raise SystemExit(native.unavailable_reason())
    torch.set_num_threads(args.threads)
    allocator = retain_freed_memory()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    results = []
    for path in args.saved:
        results.append(model_result(path, ispc.load(path), x, runs=args.runs,
                                    flush_mb=args.flush_mb))
        _print(results[-1])
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        calib = [torch.randn(4, 3, args.image_size, args.image_size, generator=g) for _ in range(2)]
        cfg = (ispc.GatingConfig(keep_ratio=args.keep, mode="topk", latency_aware=True,
                                 latency_batch_size=args.batch_size, latency_rounds=3)
               if args.latency_aware else ispc.GatingConfig(keep_ratio=args.keep, mode="topk",
                                                            channels_last=True))
        compiled = ispc.compile(model, calib, config=cfg, progress=False)
        results.append(model_result(name, compiled, x, runs=args.runs, flush_mb=args.flush_mb))
        _print(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__, "allocator": allocator,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
