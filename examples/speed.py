"""Realized vs theoretical speed-up on the CPU: the issue-4 benchmark.

For each model (random weights, 224x224 random inputs, BatchNorm folded in the dense baseline too)
ispc compiles at ``--keep-ratio`` and times gated against dense, interleaved, at each batch size;
it also times keep_ratio=1.0 (all channels kept) to measure the gating overhead. Prints a table and
writes JSON::

    python examples/speed.py --models resnet18 resnet50 vgg16_bn mobilenet_v2 --batch-sizes 1 32 \
        --json speed.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import ispc
from ispc.benchmark import benchmark, results_table
from ispc.examples.models import create_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--mode", choices=["threshold", "topk"], default="topk")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=60,
                   help="timing rounds at batch 1 (fewer let a shared VM's noise, ~5%% run to run, "
                        "through)")
    p.add_argument("--batched-rounds", type=int, default=5, help="timing rounds at batch > 1")
    p.add_argument("--latency-rounds", type=int, default=15,
                   help="per-layer timing rounds of the latency-aware cost model at batch 1 "
                        "(a third of this, at least 3, at batch > 1)")
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                   help="also time keep_ratio=1.0 against dense")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(4)]
    results, overhead = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        for bs in args.batch_sizes:
            lat_rounds = args.latency_rounds if bs == 1 else max(3, args.latency_rounds // 3)
            cfg = ispc.GatingConfig(keep_ratio=args.keep_ratio, mode=args.mode,
                                    latency_aware=args.latency_aware, latency_batch_size=bs,
                                    latency_rounds=lat_rounds)
            compiled = ispc.compile(model, calib, config=cfg)
            results += benchmark(model, compiled, (3, size, size), batch_sizes=(bs,),
                                 rounds=args.rounds if bs == 1 else args.batched_rounds,
                                 warmup=5 if bs == 1 else 1, name=name)
            print(results_table(results[-1:]), file=sys.stderr)
        if args.overhead:
            full = ispc.compile(model, calib, config=ispc.GatingConfig(keep_ratio=1.0, mode=args.mode))
            overhead += benchmark(model, full, (3, size, size), batch_sizes=(1,), rounds=args.rounds,
                                  name=f"{name} keep=1.0")
    print(f"\nispc {ispc.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, mode={args.mode}, keep_ratio={args.keep_ratio}, "
          f"latency_aware={args.latency_aware}, {size}x{size}\n")
    print(results_table(results, tablefmt="github"))
    if overhead:
        print("\nkeep_ratio=1.0 (gating overhead; realized < 1.0 means slower than dense):\n")
        print(results_table(overhead, tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__,
                       "threads": torch.get_num_threads(),
                       "results": [r.to_dict() for r in results],
                       "overhead": [r.to_dict() for r in overhead]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
