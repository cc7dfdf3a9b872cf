"""Each op of a compiled model's native programs timed in situ, inside whole forward passes.

A compiled model on the eager backend runs its native layers as programs, one C call each
(``ispc.native_plan``); ``benchmarks/insitu.py`` and ``peers_profile.py`` time the layer-by-layer
path instead, which that call skips. This script runs the model as deployed and reads each op's
seconds from ``OpProgram.run(slots, times)`` (the C side's per-op timer: ~0.1 us an op), then the
median over ``--runs`` passes per op, with the layers each op covers; besides, the whole forward
pass and each program's own time, so that what runs outside the programs (the classifier,
Python) shows. Models are saved archives (``--saved``, e.g. what ``benchmarks/peers.py
--compiled-dir`` leaves) or compiled here (``--models``: topk at ``--keep``, latency-aware at
the batch size unless ``--no-latency-aware``). Run it under ``cpulock``::

    cpulock python benchmarks/program_ops.py --saved peers-cache/resnet50-b1-k1.0.ispc --runs 40
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


def op_rows(model, x: torch.Tensor, *, runs: int) -> tuple[list[dict], dict]:
    """Per op of each program of ``model`` (its eager runner), in run order: the layers it covers,
    their module types and the op's median ms over ``runs`` whole forward passes on ``x``; and the
    medians of the whole pass and of each program's own call."""
    runner = model.__dict__.get("_runner")
    programs = list(getattr(runner, "_programs", []))
    timers: list[tuple[int, object, torch.Tensor | None, list]] = []
    own: dict[int, list[float]] = {i: [] for i in range(len(programs))}
    with torch.no_grad():
        for _ in range(3):
            model(x)  # plans built, workspaces grown
        for i, prog in enumerate(programs):
            plan = next((p for _, p in prog._plans.values() if p is not None), None)
            if plan is None:
                continue  # the program runs its layers one by one on these inputs
            times = torch.zeros(len(plan.program), dtype=torch.float64)
            timers.append((i, plan, times, []))
            run = plan.program.run

            def timed(slots, _times=None, run=run, times=times, i=i):
                t0 = time.perf_counter()
                run(slots, times)
                own[i].append(time.perf_counter() - t0)
            plan.program.run = timed
        whole = []
        serve = model.__dict__.get("_serve")
        model.__dict__["_serve"] = None  # the full path, which calls program.run (timed)
        try:
            for _ in range(runs):
                for _, _, times, per in timers:
                    times.zero_()
                t0 = time.perf_counter()
                model(x)
                whole.append(time.perf_counter() - t0)
                for _, _, times, per in timers:
                    per.append(times.clone())
        finally:
            model.__dict__["_serve"] = serve
            for _, plan, _, _ in timers:
                del plan.program.run  # the instance attribute: the class's method again
    rows = []
    for i, plan, _, per in timers:
        prog = programs[i]
        med = torch.stack(per).median(0).values * 1e3
        for j, (a, b) in enumerate(plan.spans):
            rows.append({"program": i, "op": j,
                         "layers": "+".join(_layer(prog, k) for k in range(a, b + 1)),
                         "modules": "+".join(_kind(prog, k) for k in range(a, b + 1)),
                         "ms": float(med[j])})
    totals = {"whole_ms": 1e3 * statistics.median(whole),
              "programs_ms": [1e3 * statistics.median(v) if v else None for v in own.values()],
              "programs_planned": len(timers), "programs": len(programs)}
    return rows, totals


def _layer(prog, k: int) -> str:
    """A program's ``k``-th layer by its module's name, or its node's (a classifier's flatten)."""
    node = prog._seg[k]
    return str(node.target) if node.op == "call_module" else node.name


def _kind(prog, k: int) -> str:
    """The module type of a program's ``k``-th layer, or the function's name (a classifier's
    flatten and dropout, which have no module)."""
    mod = prog._mods[k]
    if mod is not None:
        return type(mod).__name__
    target = prog._seg[k].target
    return getattr(target, "__name__", str(target))


def _model(args: argparse.Namespace, spec: str, saved: bool):
    if saved:
        return ispc.load(spec), spec
    torch.manual_seed(0)
    model = create_model(spec).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, args.image_size, args.image_size, generator=g) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=args.keep, mode="topk", latency_aware=args.latency_aware,
                            latency_batch_size=args.batch_size, latency_rounds=5,
                            channels_last=True, dense_route="off")
    return ispc.compile(model, calib, config=cfg, progress=False), f"{spec} keep {args.keep}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saved", nargs="+", default=[], help="saved ispc archives (ispc.save)")
    p.add_argument("--models", nargs="+", default=[], help="models to compile here")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not args.saved and not args.models:
        p.error("name --saved archives or --models to compile")
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    results = []
    for spec, saved in [(s, True) for s in args.saved] + [(m, False) for m in args.models]:
        model, name = _model(args, spec, saved)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        rows, totals = op_rows(model, x, runs=args.runs)
        print(f"\n{name}: whole {totals['whole_ms']:.3f} ms, programs "
              + ", ".join("per layer" if t is None else f"{t:.3f}" for t in totals["programs_ms"])
              + f" ms; ops {sum(r['ms'] for r in rows):.3f} ms in all")
        print(tabulate([[r["program"], r["layers"], r["modules"], f"{r['ms']:.3f}"] for r in rows],
                       headers=["program", "layers", "modules", "ms (median)"]))
        results.append({"model": name, "batch": args.batch_size, **totals, "ops": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
