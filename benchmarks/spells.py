"""How each runtime behaves in this machine's slow spells: many short interleaved rounds, split by
the reference runtime's own round time into its fast and slow halves.

A shared VM has spells (seconds to minutes) in which every runtime runs slower; ``peers.py``'s
few rounds in fresh processes then land wherever the spells fall. Here ONNX Runtime, OpenVINO f32
and a saved ispc archive each run in a worker process of their own, all alive at once
(``ispc.dense_route.time_interleaved``), and take turns: per round a short block of calls each,
the order rotated, so neighbouring blocks see the same state of the machine. Rounds are split at
the median of the reference's (``--reference``, ONNX Runtime by default) block time; each runtime's
median over the slow half over its median over the fast half is its slowdown in the spells, and
median/min its spread. Per-round ratios against ispc are paired as ``peers.py`` pairs them::

    cpulock python benchmarks/spells.py --saved D/mobilenet_v2-b1-k0.5.ispc --model mobilenet_v2 \\
        --rounds 60
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ispc import dense_route
from ispc.benchmark import input_batches
from ispc.examples.models import create_model
from ispc.timing import paired


def halves(rounds: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per runtime: its median block time over the rounds where ``reference`` ran in its fast
    half and in its slow half, their ratio, its minimum and median/min."""
    ref = rounds[reference]
    cut = sorted(ref)[len(ref) // 2]
    out = {}
    for name, times in rounds.items():
        fast = [t for t, r in zip(times, ref) if r < cut] or times
        slow = [t for t, r in zip(times, ref) if r >= cut]
        f, s = statistics.median(fast), statistics.median(slow)
        out[name] = {"fast_ms": f, "slow_ms": s, "slowdown": s / f, "min_ms": min(times),
                     "spread": statistics.median(times) / min(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saved", required=True, help="an ispc archive (ispc.save)")
    p.add_argument("--model", default="mobilenet_v2", help="the dense model, for the runtimes")
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"],
                   choices=["onnxruntime", "openvino"])
    p.add_argument("--reference", default=None, help="whose block times split the rounds "
                   "(default: the first runtime)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--block-s", type=float, default=0.15, help="about this long a block of calls")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.reference not in (None, "ispc", *args.runtimes):
        p.error(f"--reference must be ispc or one of --runtimes, got {args.reference!r}")
    torch.set_num_threads(args.threads)
    size = args.image_size
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x = torch.stack(input_batches(1, input_shape=(3, size, size), pool=4, seed=1))
    with tempfile.TemporaryDirectory(prefix="ispc-spells-") as tmp:
        onnx = dense_route.export_dense_onnx(model, torch.randn(2, 3, size, size),
                                             Path(tmp) / "model.onnx")
        jobs = {r: {"runtime": r, "artifact": str(onnx)} for r in args.runtimes}
        jobs["ispc"] = {"runtime": "ispc", "artifact": str(Path(args.saved).resolve())}
        res = dense_route.time_interleaved(jobs, x, threads=args.threads, rounds=args.rounds,
                                           warmup=3, block_s=args.block_s, max_calls=40)
    failed = {k: v["note"] for k, v in res.items() if v["ms"] is None}
    if failed:
        print(f"failed: {failed}")
        return 1
    rounds = {k: v["rounds_ms"] for k, v in res.items()}
    reference = args.reference or args.runtimes[0]
    split = halves(rounds, reference)
    rows = []
    for name, h in split.items():
        pair = paired(rounds[name], rounds["ispc"]) if name != "ispc" else None
        rows.append({"runtime": name, **h, "vs_ispc_paired": pair.median if pair else None})
        print(f"{name:12s} fast half {h['fast_ms']:.3f} ms, slow half {h['slow_ms']:.3f} "
              f"(x{h['slowdown']:.3f}); min {h['min_ms']:.3f}, median/min x{h['spread']:.3f}"
              + (f"; per round over ispc x{pair.median:.3f}" if pair else ""), flush=True)
    if args.json:
        record = {"command": " ".join(sys.argv), "reference": reference, "rows": rows,
                  "rounds_ms": rounds}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
