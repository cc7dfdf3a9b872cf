"""Realized vs theoretical speed-up on the CPU: the issue-4 benchmark.

For each model (random weights, 224x224 random inputs: a few distinct batches cycled per batch size,
as ``ispc.benchmark.benchmark`` does; BatchNorm folded in the dense baseline too)
ispc compiles at ``--keep-ratio`` and times gated against dense, interleaved, at each batch size;
it also times keep_ratio=1.0 (all channels kept) to measure the gating overhead. Prints a table and
writes JSON::

    python benchmarks/speed.py --models resnet18 resnet50 vgg16_bn mobilenet_v2 --batch-sizes 1 32 \
        --json speed.json

``--profile N`` also runs N passes of each dense and gated model under ``torch.profiler`` and prints
where the time goes, per ATen op and pass (the README's batch-1 breakdown)::

    python benchmarks/speed.py --models resnet18 --batch-sizes 1 --no-overhead --profile 20
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import ispc
from ispc.benchmark import benchmark, dense_baseline, results_table, retain_freed_memory
from ispc.examples.models import create_model
from ispc.passes.channels_last import runs_channels_last

PROFILE_ROWS = 12


def profile_ops(models: dict[str, torch.nn.Module], x: torch.Tensor,
                passes: int) -> dict[str, list[dict]]:
    """Self CPU time per ATen op and pass for each model, largest first. Passes alternate between
    the models (each under its own profiler) so that a drifting machine affects all alike."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, dict[str, list[float]]] = {label: {} for label in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(passes):
            for label, m in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    m(x)
                for e in prof.key_averages():
                    acc = totals[label].setdefault(e.key, [0.0, 0])
                    acc[0] += e.self_cpu_time_total
                    acc[1] += e.count
    return {label: sorted(({"op": op, "self_ms": t / 1e3 / passes, "calls": c / passes}
                           for op, (t, c) in ops.items() if t > 0),
                          key=lambda o: o["self_ms"], reverse=True)
            for label, ops in totals.items()}


def profile_table(profiles: dict[str, list[dict]]) -> str:
    """Side-by-side top ops (ms per pass) with each model's total."""
    from tabulate import tabulate

    rows = []
    for label, ops in profiles.items():
        total = sum(o["self_ms"] for o in ops)
        rows += [[label, o["op"], o["self_ms"], o["calls"]] for o in ops[:PROFILE_ROWS]]
        rows.append([label, "(all ops)", total, sum(o["calls"] for o in ops)])
    return tabulate(rows, headers=["model", "op", "self ms / pass", "calls / pass"],
                    floatfmt=".3f", tablefmt="github")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
    p.add_argument("--fuse-epilogues", action=argparse.BooleanOptionalAction, default=True,
                   help="fold residual adds and ReLUs into gated layers (GatingConfig.fuse_epilogues)")
    p.add_argument("--gate-linear", action=argparse.BooleanOptionalAction, default=False,
                   help="also gate the classifier's linear layers (GatingConfig.gate_linear)")
    p.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                   help="also time keep_ratio=1.0 against dense")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: where the models run (CUDA gated layers use the Triton kernel)")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in glibc's malloc (ispc.benchmark.retain_freed_memory), "
                        "for dense and gated alike; off: the allocator's defaults")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N passes of dense and gated per ATen op (default: off)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="GatingConfig.channels_last: auto (None: measured with --latency-aware), "
                        "on (True) or off (False)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    layout = {"auto": None, "on": True, "off": False}[args.channels_last]
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = retain_freed_memory() if args.retain_memory else "glibc defaults"
    size = args.image_size
    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    calib = [torch.randn(8, 3, size, size, generator=g).to(device) for _ in range(4)]
    results, overhead, profiles, compiles = [], [], [], []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval().to(device)
        for bs in args.batch_sizes:
            lat_rounds = args.latency_rounds if bs == 1 else max(3, args.latency_rounds // 3)
            cfg = ispc.GatingConfig(keep_ratio=args.keep_ratio, mode=args.mode,
                                    latency_aware=args.latency_aware, latency_batch_size=bs,
                                    latency_rounds=lat_rounds, fuse_epilogues=args.fuse_epilogues,
                                    gate_linear=args.gate_linear, channels_last=layout)
            compiled = ispc.compile(model, calib, config=cfg)
            compiles.append({"model": name, "batch_size": bs,
                             "channels_last": runs_channels_last(compiled.graph_module),
                             "notes": [n for n in compiled.report.notes
                                       if n.startswith(("whole-model", "channels_last"))]})
            print(f"{name}: maps {'channels-last' if compiles[-1]['channels_last'] else 'NCHW'}; "
                  + "; ".join(compiles[-1]["notes"]), file=sys.stderr)
            results += benchmark(model, compiled, (3, size, size), batch_sizes=(bs,),
                                 rounds=args.rounds if bs == 1 else args.batched_rounds,
                                 warmup=5 if bs == 1 else 1, name=name,
                                 retain_memory=args.retain_memory)
            print(results_table(results[-1:]), file=sys.stderr)
            if args.profile:
                x = torch.randn(bs, 3, size, size, generator=g).to(device)
                dense = dense_baseline(model, x[:1],
                                       channels_last=runs_channels_last(compiled.graph_module))
                ops = profile_ops({"dense": dense, "gated": compiled}, x,
                                  args.profile)
                profiles.append({"model": name, "batch_size": bs, "passes": args.profile, "ops": ops})
        if args.overhead:
            full = ispc.compile(model, calib, config=ispc.GatingConfig(
                keep_ratio=1.0, mode=args.mode, gate_linear=args.gate_linear))
            overhead += benchmark(model, full, (3, size, size), batch_sizes=(1,), rounds=args.rounds,
                                  name=f"{name} keep=1.0", retain_memory=args.retain_memory)
    print(f"\nispc {ispc.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, mode={args.mode}, keep_ratio={args.keep_ratio}, "
          f"latency_aware={args.latency_aware}, fuse_epilogues={args.fuse_epilogues}, "
          f"gate_linear={args.gate_linear}, "
          f"{size}x{size}, allocator: {allocator}, device: {_device_name(device)}\n")
    print(results_table(results, tablefmt="github"))
    if overhead:
        print("\nkeep_ratio=1.0 (gating overhead; realized < 1.0 means slower than dense):\n")
        print(results_table(overhead, tablefmt="github"))
    for prof in profiles:
        print(f"\n{prof['model']}, batch {prof['batch_size']}: self CPU time per ATen op "
              f"(torch.profiler, {prof['passes']} passes)\n")
        print(profile_table(prof["ops"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__, "allocator": allocator,
                       "threads": torch.get_num_threads(), "device": _device_name(device),
                       "results": [r.to_dict() for r in results],
                       "overhead": [r.to_dict() for r in overhead], "compiles": compiles,
                       **({"profiles": profiles} if profiles else {})}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
