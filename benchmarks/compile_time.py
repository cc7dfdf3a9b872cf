"""How long latency-aware compilation takes, and where the time goes (issue 26: ResNet-50 for
batch 32 within 2 minutes on a 2-core machine).

Compiles each model (random weights, random normal calibration batches) latency-aware at the batch
size given, prints the compile time, the layers gated and the report's notes (the whole-model
check's figures), and with ``--profile N`` the N functions that took longest under cProfile::

    python benchmarks/compile_time.py --models resnet50 --batch-size 32 --latency-rounds 5
    python benchmarks/compile_time.py --models resnet50 --batch-size 32 --profile 30

Run it alone on the machine (``cpulock``): the compile times kernels, and its choices and its
duration depend on the machine's load.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

import ispc
from ispc.examples.models import create_model
from ispc.passes.base import PASSES
from ispc.runtimes import machine_info
from ispc.timing import retain_freed_memory


def _time_passes() -> dict[str, float]:
    """Each registered pass wrapped to add its seconds to the dict returned."""
    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(gm, state):
            t0 = time.perf_counter()
            try:
                return fn(gm, state)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return run

    for name, fn in list(PASSES.items()):
        PASSES[name] = timed(name, fn)
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50"])
    p.add_argument("--batch-size", type=int, default=32, help="latency_batch_size")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--mode", choices=["topk", "threshold"], default="topk")
    p.add_argument("--latency-rounds", type=int, default=15)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--calibration", type=int, nargs=2, default=[4, 8], metavar=("BATCHES", "SIZE"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="run under cProfile and print the N functions with most cumulative time")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--pass-times", action="store_true", help="print the seconds each pass took")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    spent = _time_passes() if args.pass_times else {}
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        g = torch.Generator().manual_seed(0)
        n, size = args.calibration
        calib = [torch.randn(size, 3, args.image_size, args.image_size, generator=g)
                 for _ in range(n)]
        cfg = ispc.GatingConfig(keep_ratio=args.keep_ratio, mode=args.mode, latency_aware=True,
                                latency_batch_size=args.batch_size,
                                latency_rounds=args.latency_rounds)
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        compiled = ispc.compile(model, calib, config=cfg, progress=args.progress)
        if prof:
            prof.disable()
        secs = time.perf_counter() - t0
        gated = compiled.report.summary["layers_gated"]
        print(f"{name}: compiled for batch {args.batch_size} (latency_rounds "
              f"{args.latency_rounds}) in {secs:.1f} s{' under cProfile' if prof else ''}; "
              f"{gated} layers gated")
        for note in compiled.report.notes:
            print(f"  note: {note}")
        if spent:
            print("  passes: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items() if v >= 0.1))
            spent.clear()
        if prof:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
            print(out.getvalue())
        rows.append({"model": name, "batch_size": args.batch_size, "compile_s": secs,
                     "profiled": bool(prof), "layers_gated": gated,
                     "config": cfg.to_dict(), "notes": compiled.report.notes})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(args.threads),
                                               "command": sys.argv, "results": rows}, indent=2)
                                   + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
