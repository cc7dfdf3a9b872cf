"""A/B timing of native-kernel build variants in one process.

The default build against the same source compiled with other ``-D`` settings (``SELECT_CHUNK_BYTES``, ``STREAM_BYTES``, ...).

Every variant is loaded at once and swapped in per call, and the candidates run interleaved
(``ispc.benchmark.time_interleaved``, in a fresh random order each round), so a noisy machine
shifts them all alike. Per layer (ResNet
and VGG shapes, half the input channels kept by top-k, every orientation) or per whole model
(compiled once, latency-aware at the batch size, with the default build, then loaded once per
build: a native program binds the library it first ran under; dense beside it)::

    python benchmarks/kernel_ab.py --variant=-DSTREAM_BYTES=0 --batch-size 32 --threads 2
    python benchmarks/kernel_ab.py --variant=-DSELECT_CHUNK_BYTES=1099511627776LL \\
        --models resnet18 resnet50 --batch-size 32 --threads 2

A variant may change tuning constants only, and the channel-lane kernel's rows (``-DCO_MR=14``):
the other register blocks (ISA flags such as ``-mno-avx512f``) decide the packed weight layout, so
such variants are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F
from tabulate import tabulate

import ispc
from ispc.benchmark import dense_baseline, retain_freed_memory, time_interleaved
from ispc.examples.models import create_model
from ispc.ops import gated_conv as gc
from ispc.ops import native

# (cin, cout, kernel, stride, input size): ResNet-18/50 and VGG-16 layers
CONVS = [(64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7),
         (64, 128, 3, 2, 56), (256, 64, 1, 1, 56), (64, 256, 1, 1, 56), (512, 1024, 1, 2, 28),
         (1024, 256, 1, 1, 14), (512, 128, 1, 1, 28), (128, 512, 1, 1, 28), (256, 1024, 1, 1, 14)]


def load_variants(variants: list[str]) -> dict[str, object]:
    """{"default": the normal build, flags: that build with these extra flags}."""
    base = native._load()
    if base is None:
        raise SystemExit(native.unavailable_reason())
    libs = {"default": base}
    for v in variants:
        lib = native._build(tuple(v.split()))
        # the packed weights' blocks: output channels are the rows of the pixel-lane kernel and
        # the lanes of the others (the channel-lane kernel's rows, positions, may differ: -DCO_MR)
        def packing(m):
            return (m.ispc_block_rows(native.ORIENT_PIX), m.ispc_block_lanes(native.ORIENT_CO),
                    m.ispc_block_lanes(native.ORIENT_FULL))
        if packing(lib) != packing(base):
            raise SystemExit(f"variant {v!r} changes the register blocks (packed weights differ)")
        libs[v] = lib
    return libs


def _with(lib, fn):
    """fn() with ``lib`` as the native library (restored afterwards)."""
    saved, native._lib = native._lib, lib
    try:
        return fn()
    finally:
        native._lib = saved


def _candidates(libs, fn):
    return {name: (lambda lib=lib: _with(lib, fn)) for name, lib in libs.items()}


def layer_rows(libs, *, batch_size: int, rounds: int, convs=CONVS) -> list[dict]:
    """Per layer and orientation: median ms of dense and of each build, outputs compared."""
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for cin, cout, k, s, hw in convs:
            x = torch.randn(batch_size, cin, hw, hw, generator=g).relu()
            w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
            ones = torch.ones(cin)
            for orient, oname in ((native.ORIENT_PIX, "pix"), (native.ORIENT_CO, "co"),
                                  (native.ORIENT_CL, "cl")):
                if orient == native.ORIENT_CL and k == 1:
                    continue  # predicted and timed for kernels with several taps only
                layer = native.NativeLayer(w, b, (s, s), (k // 2, k // 2), (1, 1), orient)

                def run():
                    return layer.gated(x, ones, gc.TOPK, 0.0, cin // 2, gc.SALIENCY_L2)

                outs = [_with(lib, run) for lib in libs.values()]
                cands = _candidates(libs, run)
                cands["dense"] = lambda: F.conv2d(x, w, b, s, k // 2)
                t = time_interleaved(cands, rounds=rounds, warmup=2, progress=False, shuffle=0)
                rows.append({"layer": f"{cin}->{cout} {k}x{k}/{s} {hw}x{hw}", "orient": oname,
                             **{f"{n}_ms": r.median for n, r in t.items()},
                             "identical": all(torch.equal(outs[0], o) for o in outs[1:])})
                print(_row_text(rows[-1], libs), flush=True)
    return rows


def model_rows(libs, models: list[str], *, batch_size: int, rounds: int, size: int) -> list[dict]:
    """Per model: dense and the gated model under each build (compiled once with the default
    build, saved, and loaded once per build: _loaded_per_build)."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(4)]
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", latency_aware=True,
                                latency_batch_size=batch_size, latency_rounds=5)
        compiled = ispc.compile(model, calib, config=cfg, progress=False)
        x = torch.randn(batch_size, 3, size, size, generator=g)
        dense = dense_baseline(model, x[:1])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.ispc")
            ispc.save(compiled, path)
            calls = _loaded_per_build(libs, path, x)
        rows.append(_call_row(libs, name, calls, lambda: dense(x), rounds=rounds))
    return rows


def _loaded_per_build(libs, path: str, x) -> dict:
    """A call of the archive at ``path`` per build, each loaded and first called under its build:
    a native program binds its library's entry when it plans its first input, so one compiled
    model swapped between builds would run the build it first ran under every time."""
    calls = {}
    for name, lib in libs.items():
        compiled = _with(lib, lambda: ispc.load(path))
        calls[name] = lambda c=compiled: c(x)
    return calls


def saved_rows(libs, archives: list[str], *, rounds: int, size: int) -> list[dict]:
    """Per saved archive (``ispc.save``, e.g. ``peers.py --compiled-dir``'s, compiled with the
    default build): dense (the archive's model with every gate open is not at hand, so dense is
    the archive's own call under the default build again, an A/A control) and each build."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for path in archives:
        base = os.path.basename(path)
        batch = int(base.split("-b")[-1].split("-")[0]) if "-b" in base else 1
        x = torch.randn(batch, 3, size, size, generator=g)
        calls = _loaded_per_build(libs, path, x)
        rows.append(_call_row(libs, path, calls, calls["default"], rounds=rounds, paired=True))
    return rows


def _call_row(libs, label: str, calls: dict, dense, *, rounds: int, paired: bool = False) -> dict:
    """Each build's call (``calls``, by build) under its build and ``dense``, interleaved in a
    shuffled order: the medians (and with ``paired`` each one's per-round ratio to the default
    build), and whether the builds' outputs are identical. Printed as it is measured."""
    with torch.no_grad():
        outs = [_with(lib, calls[n]) for n, lib in libs.items()]
        cands = {n: (lambda lib=lib, f=calls[n]: _with(lib, f)) for n, lib in libs.items()}
        cands["dense"] = dense
        t = time_interleaved(cands, rounds=rounds, warmup=1, progress=False, shuffle=0)
    row = {"model": label, **{f"{n}_ms": r.median for n, r in t.items()}}
    if paired:
        row.update({f"{n}_paired": statistics.median(a / b for a, b in zip(
            r.times_ms, t["default"].times_ms)) for n, r in t.items()})
    row["identical"] = all(torch.equal(outs[0], o) for o in outs[1:])
    print(_row_text(row, libs), flush=True)
    return row


def _row_text(row: dict, libs) -> str:
    base = row["default_ms"]
    parts = [f"dense {row['dense_ms']:.3f} ms", f"default {base:.3f} ms "
             f"({row['dense_ms'] / base:.2f}x of dense)"]
    parts += [f"{v} {row[f'{v}_ms']:.3f} ms (default is {row[f'{v}_ms'] / base:.3f}x as fast)"
              for v in libs if v != "default"]
    parts += [f"{v} paired {row[f'{v}_paired']:.3f}" for v in [*libs, "dense"]
              if v != "default" and f"{v}_paired" in row]
    head = row.get("model") or f"{row['layer']} {row['orient']}"
    return f"{head}: " + ", ".join(parts) + ("" if row["identical"] else "  [outputs differ]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help="extra compiler flags of one variant (repeatable; write --variant=-D...)")
    p.add_argument("--models", nargs="+", default=None,
                   help="time whole models instead of single layers")
    p.add_argument("--saved", nargs="+", default=None,
                   help="time saved archives (ispc.save) instead; 'dense' is then the default "
                        "build again (an A/A control); the batch is read from '-bN-' in the name")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224, help="model inputs (with --models)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not args.variant:
        p.error("give at least one --variant")
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    libs = load_variants(args.variant)
    if args.saved:
        rows = saved_rows(libs, args.saved, rounds=args.rounds, size=args.image_size)
    elif args.models:
        rows = model_rows(libs, args.models, batch_size=args.batch_size, rounds=args.rounds,
                          size=args.image_size)
    else:
        rows = layer_rows(libs, batch_size=args.batch_size, rounds=args.rounds)
    variants = [v for v in libs if v != "default"]
    table = [[r.get("model") or f"{r['layer']} {r['orient']}", r["dense_ms"], r["default_ms"],
              *(r[f"{v}_ms"] / r["default_ms"] for v in variants)] for r in rows]
    print(tabulate(table, headers=["", "dense ms", "default ms",
                                   *(f"{v}: time / default" for v in variants)],
                   floatfmt=".3f", tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
