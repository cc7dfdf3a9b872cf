"""What the dense route's call path costs against its runtime alone (issue 26: keep 1.0 within 3%
of the fastest dense runtime).

Per model and runtime, four workers alive at once and timed in turn, paired by round
(``ispc.dense_route.time_interleaved``): the runtime alone as ``benchmarks/peers.py`` times it
(a process without torch; ONNX Runtime with its default spinning), the same in a process that
imported torch and ran a torch op (``+torch``), the route as the compile times
it (``CompiledModel`` -> ``RouteRunner`` in a torch process), and a routed archive written by
``ispc.save`` and read by ``ispc.load`` (as a user deploys it)::

    cpulock python benchmarks/route_overhead.py --models mobilenet_v2 resnet50 --rounds 15

Prints each variant's median and its median per-round ratio to the runtime alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import ispc
from ispc import dense_route
from ispc.benchmark import input_batches
from ispc.examples.models import create_model
from ispc.timing import paired


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    p.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"],
                   choices=["openvino", "onnxruntime"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-s", type=float, default=0.3, help="about this long a block of calls")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))]
        x = torch.stack(input_batches(1, input_shape=(3, 224, 224), pool=4, seed=1))
        with tempfile.TemporaryDirectory(prefix="ispc-route-ab-") as tmp:
            work = Path(tmp)
            onnx = dense_route.export_dense_onnx(model, calib[0], work / "model.onnx")
            jobs = {}
            for r in args.runtimes:
                cm = ispc.compile(model, calib, config=ispc.GatingConfig(
                    keep_ratio=1.0, latency_aware=False, dense_route=r), progress=False)
                archive = ispc.save(cm, work / f"{r}.ispc", example_inputs=calib[0])
                jobs[f"{r} alone"] = {"runtime": r, "artifact": str(onnx)}
                jobs[f"{r} +torch"] = {"runtime": r, "artifact": str(onnx), "with_torch": True}
                jobs[f"{r} route"] = {"runtime": "route", "route_runtime": r,
                                      "artifact": str(onnx)}
                jobs[f"{r} ispc.load"] = {"runtime": "ispc", "artifact": str(archive)}
            res = dense_route.time_interleaved(jobs, x, threads=args.threads, rounds=args.rounds,
                                               warmup=2, block_s=args.block_s, max_calls=60)
        for r in args.runtimes:
            base = res[f"{r} alone"]
            for v in ("alone", "+torch", "route", "ispc.load"):
                cur = res[f"{r} {v}"]
                if cur["ms"] is None:
                    print(f"{name} {r} {v}: failed ({cur['note']})")
                    continue
                pair = paired(cur["rounds_ms"], base["rounds_ms"])
                ratio, wins, n = pair.median or 1.0, pair.faster_in, pair.rounds
                rm = cur["rounds_ms"]
                rows.append({"model": name, "runtime": r, "variant": v, "ms": cur["ms"],
                             "ratio": ratio, "faster_in": wins, "rounds": n, "rounds_ms": rm})
                print(f"{name} {r:12s} {v:10s} {cur['ms']:7.3f} ms (rounds {min(rm):.3f}-"
                      f"{max(rm):.3f}, median {statistics.median(rm):.3f}); per round vs alone "
                      f"x{ratio:.3f}, faster in {wins} of {n}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
