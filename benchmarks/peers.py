"""ispc against the fastest dense runtime a user could deploy (issue 26, part 1).

For each model (random weights, 224x224, random normal inputs: a few distinct batches cycled) and
batch size, ispc compiles at each keep ratio (topk, latency-aware at that batch size), then
``ispc.runtimes.time_runtimes`` times the dense model in PyTorch eager (NCHW, NHWC), torch.compile
(inductor, freezing), ONNX Runtime, OpenVINO (f32, and its default: bf16 on AMX CPUs) and the
compiled models saved and loaded in fresh processes, each runtime in processes of its own, rotated
over rounds. Prints a table (the fastest float32 dense runtime in bold) and writes JSON::

    python benchmarks/peers.py --models resnet18 --batch-sizes 1 --json peers-r18-b1.json
    python benchmarks/peers.py --merge peers-*.json        # one table from several runs
    python benchmarks/peers.py --interleave --no-in-process  # live workers, blocks in turn
    python benchmarks/peers.py --max-isa avx2 --runtimes openvino   # an AVX2-only CPU, emulated

``--interleave`` starts every runtime's worker (and each compiled model's) once, warms them up,
then times short blocks of calls in turn, round by round: this VM's slow spells (seconds to
minutes, 20-50% slower) then fall on every runtime's neighbouring blocks instead of on one
runtime's process; paired ratios are per round of blocks. The JSON and table name the method.

``--max-isa avx2`` emulates an AVX2-only CPU on an AVX-512 one: ispc's kernels are built with
``-mno-avx512f``, oneDNN (in PyTorch and OpenVINO) is limited by ``ONEDNN_MAX_CPU_ISA=AVX2`` and
ATen by ``ATEN_CPU_CAPABILITY=avx2``. ONNX Runtime picks its kernels by CPUID and has no such
switch, so it is refused in that mode. The memory system stays the AVX-512 machine's: this checks
that no path falls back to slow code, it does not replace a figure measured on an AVX2 CPU.

Progress goes to stderr (a VGG-16 compile takes ~40 s at batch 1, longer at 32). Run it alone on
the machine (``cpulock``): timings taken while something else computes are worthless.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import ispc
from ispc import dense_route
from ispc.benchmark import input_batches
from ispc.examples.models import create_model
from ispc.passes.channels_last import runs_channels_last
from ispc.runtimes import (BASELINES, DENSE_RUNTIMES, METHODS, RuntimeTiming, compare,
                           export_dense_onnx, machine_info, runtimes_json, runtimes_table,
                           time_runtimes)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compile_model(model: torch.nn.Module, calib: list[torch.Tensor], *, keep: float, bs: int,
                  args: argparse.Namespace, cache: Path | None, name: str
                  ) -> tuple[ispc.CompiledModel, dict]:
    """ispc's model at ``keep`` for batch ``bs`` (latency-aware there), or the archive a previous
    run left in ``cache``."""
    path = cache / f"{name}-b{bs}-k{keep}.ispc" if cache is not None else None
    if path is not None and path.exists():
        say(f"peers: {name} batch {bs} keep {keep}: loading {path}")
        compiled = ispc.load(path)
        sidecar = path.with_suffix(".json")
        info = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        return compiled, {**info, "source": f"loaded from {path}"}
    lat_rounds = args.latency_rounds if bs == 1 else max(3, args.latency_rounds // 3)
    cfg = ispc.GatingConfig(keep_ratio=keep, mode=args.mode, latency_aware=args.latency_aware,
                            latency_batch_size=bs, latency_rounds=lat_rounds,
                            dense_route=args.dense_route or route_for(args.max_isa))
    say(f"peers: {name} batch {bs} keep {keep}: compiling (latency-aware={args.latency_aware})")
    t0 = time.perf_counter()
    compiled = ispc.compile(model, calib, config=cfg, progress=True)  # bars on stderr
    secs = time.perf_counter() - t0
    say(f"peers: {name} batch {bs} keep {keep}: compiled in {secs:.1f} s")
    notes = [n for n in compiled.report.notes
             if n.startswith(("whole-model", "channels_last", "dense route"))]
    info = {"source": "compiled in this process", "compile_s": secs,
            "layers_gated": compiled.report.summary.get("layers_gated"),
            "channels_last": runs_channels_last(compiled.graph_module), "notes": notes}
    for n in notes:
        say(f"peers: {name} batch {bs} keep {keep}: {n}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ispc.save(compiled, path)
        path.with_suffix(".json").write_text(json.dumps(info))
    return compiled, info


#: the environment that limits every runtime (and ispc's kernels) to an ISA, per --max-isa
MAX_ISA_ENV = {"avx2": {"ISPC_NATIVE_FLAGS": "-mno-avx512f", "ONEDNN_MAX_CPU_ISA": "AVX2",
                        "ATEN_CPU_CAPABILITY": "avx2"}}


def route_for(max_isa: str | None) -> str:
    """The dense route ispc's compiles may take: any installed runtime, or under ``--max-isa``
    OpenVINO only (ONNX Runtime ignores the limit: a route through it would run AVX-512 kernels in
    an emulated AVX2 figure), or none where OpenVINO is not installed."""
    if max_isa is None:
        return "auto"
    return "openvino" if dense_route.installed("openvino") else "off"


def limit_isa(max_isa: str | None, runtimes: list[str]) -> str | None:
    """Why ``max_isa`` cannot be emulated for these runtimes (None: it can). When the environment
    does not limit this process yet, re-executes the script with it (oneDNN and ATen read it once,
    at start); the workers inherit it."""
    if max_isa is None:
        return None
    if "onnxruntime" in runtimes:
        return ("ONNX Runtime picks its kernels by CPUID and cannot be limited to "
                f"{max_isa}; leave it out, e.g. --runtimes openvino eager")
    env = MAX_ISA_ENV[max_isa]
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return None


def run(args: argparse.Namespace, scratch: str) -> tuple[list[RuntimeTiming], list[dict], dict]:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    size = args.image_size
    cache = Path(args.compiled_dir) if args.compiled_dir else None
    timings: list[RuntimeTiming] = []
    compiles: list[dict] = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = create_model(name).eval()
        g = torch.Generator().manual_seed(args.seed)
        calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(4)]
        onnx_path = None
        workdir = Path(args.workdir) / name if args.workdir else None
        if not args.compile_only and any(r in ("onnxruntime", "openvino", "openvino_default")
                                         for r in args.runtimes):
            target = Path(args.onnx_dir or workdir or scratch) / f"{name}.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                onnx_path = export_dense_onnx(model, calib[0][:2], target)
                say(f"peers: {name}: exported to ONNX in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:  # ORT/OpenVINO are then skipped, with the reason
                say(f"peers: {name}: ONNX export failed ({type(exc).__name__}: {exc})")
        for bs in args.batch_sizes:
            compiled = {}
            for keep in args.keep_ratios:
                cm, info = compile_model(model, calib, keep=keep, bs=bs, args=args, cache=cache,
                                         name=name)
                key = f"ispc {keep}"
                compiled[key] = cm
                compiles.append({"model": name, "batch_size": bs, "keep_ratio": keep,
                                 "entry": key, **info})
            if args.compile_only:
                continue
            batches = input_batches(bs, input_shape=(3, size, size), pool=args.input_pool,
                                    seed=args.seed + 1)
            rounds, calls, warmup = timing_plan(args, bs)
            say(f"peers: {name} batch {bs}: timing {len(args.runtimes)} runtimes and "
                f"{len(compiled)} ispc models, {rounds} rounds of {calls} calls"
                + (" (interleaved blocks)" if args.interleave else " (a process each)"))
            res = time_runtimes(model, compiled, batches, runtimes=args.runtimes,
                                threads=threads, rounds=rounds, calls=calls, warmup=warmup,
                                in_process=args.in_process, name=name,
                                onnx_path=onnx_path, workdir=(workdir / f"b{bs}") if workdir else None,
                                interleave=args.interleave,
                                settle_s=args.settle_ms / 1e3 if args.settle_ms is not None else None,
                                shuffle=args.shuffle)
            timings += res
            say(runtimes_table(res, baseline=args.baseline, tablefmt="simple"))
            if args.json:  # after every model and batch: a run cut short keeps what it measured
                write_json(args, timings, compiles, threads)
    return timings, compiles, _machine(args, threads)


def timing_plan(args: argparse.Namespace, bs: int) -> tuple[int, int, int]:
    """(rounds, timed calls, untimed calls) per process, or with ``--interleave`` per block, at
    batch size ``bs``: the options where given, else each method's defaults (interleaved: 12
    rounds of 15 calls after 5 untimed at batch 1, as a process's warm-up: after its idle wait a
    worker's first 4-7 calls ran 3-7% slow with 2; 6 rounds of 3 after 1 at larger batches)."""
    one = bs == 1
    if args.interleave:
        rounds = args.rounds or (12 if one else 6)
        calls = args.block_calls if one else args.batched_block_calls
        warmup = args.block_warmup if args.block_warmup is not None else (5 if one else 1)
        return rounds, calls, warmup
    rounds = args.rounds or 3
    return (rounds, args.calls if one else args.batched_calls,
            args.warmup if one else max(1, args.warmup // 3))


def _machine(args: argparse.Namespace, threads: int) -> dict:
    machine = machine_info(threads)
    if args.max_isa:
        machine["max_isa"] = {"isa": args.max_isa, "environment": MAX_ISA_ENV[args.max_isa]}
    return machine


def write_json(args: argparse.Namespace, timings: list[RuntimeTiming], compiles: list[dict],
               threads: int) -> None:
    config = {k: v for k, v in vars(args).items() if k != "merge"}
    method = "interleaved" if args.interleave else "processes"
    Path(args.json).write_text(runtimes_json(timings, baseline=args.baseline,
                                             machine=_machine(args, threads),
                                             command=" ".join(sys.argv), config=config,
                                             method=method, method_note=METHODS[method],
                                             compiles=compiles))


def merge(paths: list[str]) -> tuple[list[RuntimeTiming], list[dict], dict]:
    timings, compiles, machine = [], [], {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        timings += [RuntimeTiming.from_dict(t) for t in doc["timings"]]
        compiles += doc.get("compiles", [])
        machine = machine or doc.get("machine", {})
    return timings, compiles, machine


def summary_lines(timings: list[RuntimeTiming], compiles: list[dict], machine: dict,
                  baseline: str) -> list[str]:
    lines = []
    isa = ", ".join(k for k, v in machine.get("isa", {}).items() if v)
    v = machine.get("versions", {})
    lines.append(f"CPU: {machine.get('cpu')} ({isa}); {machine.get('threads')} threads; torch "
                 f"{v.get('torch')}, onnxruntime {v.get('onnxruntime')}, openvino "
                 f"{v.get('openvino')}, ispc {v.get('ispc')}. Medians of every timed call over all "
                 f"rounds (ms); ** = fastest float32 dense runtime; baseline: {baseline}.")
    for method in sorted({t.method for t in timings}):
        lines.append(f"Timed by {method}: {METHODS.get(method, method)}"
                     + _plan(next(t for t in timings if t.method == method)) + ".")
    if machine.get("max_isa"):
        limit = machine["max_isa"]
        lines.append(f"Emulated {limit['isa']}-only CPU on this one: "
                     + ", ".join(f"{k}={v}" for k, v in limit["environment"].items())
                     + " (the memory system is this machine's).")
    for c in compare(timings, baseline=baseline):
        over = ", ".join(f"{k} {x:.2f}x" for k, x in c.over.items())
        paired = (f"; paired by round {c.paired_speedup:.2f}x ({c.paired_range[0]:.2f}-"
                  f"{c.paired_range[1]:.2f}x)" if c.paired_speedup is not None else "")
        if c.paired_baseline_speedup is not None and c.baseline is not None:
            paired += (f", against {c.baseline} alone {c.paired_baseline_speedup:.2f}x "
                       f"({c.paired_baseline_range[0]:.2f}-{c.paired_baseline_range[1]:.2f}x)")
        lines.append(f"  {c.model} b{c.batch_size} {c.ispc}: {c.ispc_ms:.2f} ms; vs "
                     f"{c.baseline} {c.speedup:.2f}x{paired} (theoretical "
                     f"{c.theoretical_speedup:.2f}x, realized/theoretical {c.efficiency:.2f}); "
                     f"over each: {over}"
                     if c.speedup is not None else f"  {c.model} b{c.batch_size} {c.ispc}: "
                     f"{c.ispc_ms:.2f} ms; no {baseline} baseline measured")
    for c in compiles:
        if c.get("compile_s") is not None:
            lines.append(f"  compile {c['model']} batch {c['batch_size']} keep {c['keep_ratio']}: "
                         f"{c['compile_s']:.1f} s, {c.get('layers_gated')} layers gated, maps "
                         f"{'channels-last' if c.get('channels_last') else 'NCHW'}")
    for t in timings:
        if t.available and len(t.round_medians_ms) > 1:
            r = t.round_medians_ms
            lo, hi = t.iqr_ms
            lines.append(f"  spread: {t.model} b{t.batch_size} {t.label} ({t.method}): "
                         f"{len(r)} {'block' if t.method == 'interleaved' else 'round'} medians "
                         f"{min(r):.2f}-{max(r):.2f} ms (max/min {max(r) / min(r):.3f}), IQR of "
                         f"every call {lo:.2f}-{hi:.2f}")
    for t in timings:
        if t.note:
            lines.append(f"  note: {t.model} b{t.batch_size} {t.label}: {t.note}")
        shares = [x for x in t.cpu_share if x > 0]
        if len(shares) > 1 and min(shares) < 0.75 * max(shares):
            lines.append(f"  warning: {t.model} b{t.batch_size} {t.label}: CPU share per round "
                         f"{', '.join(f'{x:.2f}' for x in shares)} (round medians "
                         f"{', '.join(f'{x:.1f}' for x in t.round_medians_ms)} ms): something "
                         "else probably ran during the low rounds")
    return lines


def _plan(t: RuntimeTiming) -> str:
    """``, 12 rounds of 15 calls ...`` for an interleaved record (its ``extra``), else ``""``."""
    x = t.extra
    if t.method != "interleaved" or "blocks" not in x:
        return ""
    return (f" ({x['blocks']} rounds, {x.get('order', 'rotated')}; per block "
            f"{x.get('block_warmup')} untimed and {x['block_calls']} timed calls, then "
            f"{x.get('settle_s', 0) * 1e3:.0f} ms idle)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16_bn",
                                                   "mobilenet_v2"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--keep-ratios", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--mode", choices=["topk", "threshold"], default="topk")
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--latency-rounds", type=int, default=15,
                   help="latency-aware timing rounds at batch 1 (a third, at least 3, at batch > 1)")
    p.add_argument("--runtimes", nargs="+", default=list(DENSE_RUNTIMES), choices=DENSE_RUNTIMES)
    p.add_argument("--baseline", choices=BASELINES, default="best")
    p.add_argument("--rounds", type=int,
                   help="processes per runtime, order rotated (default 3); with --interleave "
                        "blocks per runtime (default 12 at batch 1, 6 at larger batches)")
    p.add_argument("--calls", type=int, default=30, help="timed calls per process at batch 1")
    p.add_argument("--batched-calls", type=int, default=5, help="timed calls per process, batch > 1")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per process (a third at > 1)")
    p.add_argument("--input-pool", type=int, default=4, help="distinct batches cycled")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=False,
                   help="one worker per runtime and ispc model, all started and warmed up first, "
                        "then timed in short blocks in turn, round by round (a slow spell of the "
                        "machine falls on every runtime's blocks alike); off: a fresh process per "
                        "runtime and round")
    p.add_argument("--block-calls", type=int, default=15,
                   help="--interleave: timed calls per block at batch 1")
    p.add_argument("--batched-block-calls", type=int, default=3,
                   help="--interleave: timed calls per block at batch > 1")
    p.add_argument("--block-warmup", type=int,
                   help="--interleave: untimed calls before each block (default 5, 1 at batch > 1)")
    p.add_argument("--settle-ms", type=float,
                   help="--interleave: pause after each block, for its thread pool to stop "
                        "spinning (default ispc.runtimes.INTERLEAVE_SETTLE_S, 100 ms)")
    p.add_argument("--shuffle", type=int, metavar="SEED",
                   help="--interleave: shuffle each round's order with this seed (default: rotate)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction,
                   help="also time each compiled model in the compiling process (does the saved "
                        "model keep its speed in a fresh one?); default on, off with --interleave")
    p.add_argument("--threads", type=int)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compiled-dir", help="save compiled models here, and load them when present "
                                          "(splits a long compile from its timing)")
    p.add_argument("--onnx-dir", help="where the ONNX exports go (default: the current folder)")
    p.add_argument("--workdir", help="keep the workers' files here (default: a temporary folder)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and save to --compiled-dir, time nothing (a long compile in a "
                        "command of its own)")
    p.add_argument("--json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from earlier runs' JSON")
    p.add_argument("--max-isa", choices=sorted(MAX_ISA_ENV),
                   help="emulate a CPU without AVX-512: limit ispc's kernels, oneDNN and ATen to "
                        "this ISA (ONNX Runtime cannot be limited and is refused)")
    p.add_argument("--dense-route", choices=["auto", "onnxruntime", "openvino", "off"],
                   help="GatingConfig.dense_route of ispc's compiles (default: auto, or under "
                        "--max-isa openvino); off times the gated model itself")
    args = p.parse_args(argv)
    if not args.merge and (why := limit_isa(args.max_isa, args.runtimes)):
        p.error(why)
    if args.in_process is None:
        args.in_process = not args.interleave
    elif args.in_process and args.interleave:
        p.error("--in-process times the compiled model in the compiling process, not in a worker "
                "that --interleave can time in blocks: leave one out")
    if args.compile_only and not args.compiled_dir:
        p.error("--compile-only needs --compiled-dir (where the compiled models go)")
    if args.merge:
        timings, compiles, machine = merge(args.merge)
    else:
        with tempfile.TemporaryDirectory(prefix="ispc-peers-") as scratch:
            timings, compiles, machine = run(args, scratch)
    print(runtimes_table(timings, baseline=args.baseline, tablefmt="github"))
    print()
    print("\n".join(summary_lines(timings, compiles, machine, args.baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
