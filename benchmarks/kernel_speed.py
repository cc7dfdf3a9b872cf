"""The op-level timings behind ``lower_pools``, ``cpu_kernels.im2col`` and the native kernel's
selection rules (CPU, batch 1 unless set).

Interleaved medians (``ispc.benchmark.time_interleaved``) of PyTorch's NCHW max-pool against the
module ``lower_pools`` puts in its place (:class:`ispc.modules.StridedMaxPool2d` for VGG's
non-overlapping 2x2 pools, :class:`ispc.modules.ChannelsLastMaxPool2d` with both layout copies for
ResNet's 3x3/2 stem pool), and of ``F.unfold`` against the strided im2col, on ResNet- and VGG-sized
shapes::

    python benchmarks/kernel_speed.py --threads 2

``--native`` instead times gated convolutions at half the input channels (the top half by l2 norm
of random ReLU inputs) on ResNet-18/50 and VGG-16 layer shapes: oneDNN dense on all channels
against the native indirect GEMM in its three orientations and oneDNN on the gathered channels (the
``gather`` strategy), which is what ``select_kernels``' predicted cost model is based on::

    python benchmarks/kernel_speed.py --native --threads 2 [--batch-size 32]

``--gather`` times the ``gather`` strategy's two paths on VGG-16 layer shapes at half the channels
(batch 1): PyTorch's norm, top-k, sort and ``index_select`` (``gated_conv2d_loop``) against the
saliency, selection and gathers in C (``gated_conv2d_gather_native``), each with oneDNN's
convolution, and dense beside them (the CHANGELOG's per-layer figures)::

    python benchmarks/kernel_speed.py --gather --threads 2 --rounds 15
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from ispc.benchmark import retain_freed_memory, time_interleaved
from ispc.ops import gated_conv as gc
from ispc.ops import native
from ispc.modules import ChannelsLastMaxPool2d, StridedMaxPool2d
from ispc.ops.cpu_kernels import gated_conv2d_gather_native, gated_conv2d_native, im2col

# (cin, cout, kernel, stride, input size) of ResNet-18/50 and VGG-16 layers
CONVS = [(64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7),
         (64, 128, 3, 2, 56), (256, 64, 1, 1, 56), (64, 256, 1, 1, 56), (512, 1024, 1, 2, 28),
         (1024, 256, 1, 1, 14), (64, 64, 3, 1, 224), (128, 128, 3, 1, 112), (512, 512, 3, 1, 28)]

POOLS = [((64, 112), 3, 2, 1), ((64, 56), 3, 2, 1), ((64, 224), 2, 2, 0), ((256, 56), 2, 2, 0),
         ((512, 14), 2, 2, 0)]
IM2COL = [(32, 56), (64, 28), (128, 14), (256, 7), (32, 224), (64, 112)]

# (cin, cout, kernel, input size): VGG-16's 3x3 layers and ResNet's 56x56 ones, for --gather
GATHER_CONVS = [(64, 64, 3, 224), (128, 128, 3, 112), (256, 256, 3, 56), (64, 128, 3, 112),
                (128, 256, 3, 56), (512, 512, 3, 28), (64, 64, 3, 56), (256, 64, 1, 56)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, default=1, help="batch of the pooling inputs")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--native", action="store_true",
                   help="time the native gated-convolution kernel instead (see above)")
    p.add_argument("--gather", action="store_true",
                   help="time the gather strategy's PyTorch and C selection paths instead (see above)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    if args.native:
        return native_table(args)
    if args.gather:
        return gather_table(args)
    rows = []
    with torch.no_grad():
        for (c, hw), k, s, pad in POOLS:
            x = torch.randn(args.batch_size, c, hw, hw)
            plain = nn.MaxPool2d(k, s, pad)
            lowered = StridedMaxPool2d if StridedMaxPool2d.non_overlapping(plain) else ChannelsLastMaxPool2d
            fast = lowered(k, s, pad)
            t = time_interleaved({"a": lambda: plain(x), "b": lambda: fast(x)}, rounds=args.rounds,
                                 progress=False)
            rows.append([f"max-pool {k}x{k}/{s} ({lowered.__name__})", f"{args.batch_size}x{c}x{hw}x{hw}",
                         t["a"].median, t["b"].median, t["a"].median / t["b"].median])
        for c, hw in IM2COL:
            x = torch.randn(c, hw, hw)
            t = time_interleaved(
                {"a": lambda: F.unfold(x[None], 3, 1, 1, 1),
                 "b": lambda: im2col(x, (3, 3), (1, 1), (1, 1), (1, 1))},
                rounds=args.rounds, progress=False)
            rows.append(["im2col 3x3/1", f"{c}x{hw}x{hw}", t["a"].median, t["b"].median,
                         t["a"].median / t["b"].median])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["op", "input", "PyTorch ms", "ispc ms", "speed-up"],
                   floatfmt=".3f", tablefmt="github"))
    return 0


# the native kernel's orientations --native times (lanes over positions, over output channels from
# im2col panels, over output channels from a channels-last copy)
ORIENTS = {"pix": native.ORIENT_PIX, "co": native.ORIENT_CO, "cl": native.ORIENT_CL}


def _native_built() -> bool:
    """Whether the native library is there; says why not when it is not (both native tables need it)."""
    if not native.available():
        print(f"native kernel unavailable: {native.unavailable_reason()}")
    return native.available()


def native_table(args: argparse.Namespace) -> int:
    """Dense oneDNN vs the native kernel (three orientations) vs oneDNN on the gathered channels."""
    if not _native_built():
        return 1
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for cin, cout, k, s, hw in CONVS:
            x = torch.randn(args.batch_size, cin, hw, hw, generator=g).relu()
            w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
            keep, pad, ones = cin // 2, k // 2, torch.ones(cin)
            layers = {o: native.NativeLayer(w, b, (s, s), (pad, pad), (1, 1), o)
                      for o in ORIENTS.values()}
            idx = [torch.topk(x[i].norm(dim=(1, 2)), keep).indices.sort().values
                   for i in range(x.shape[0])]
            cands = {
                "dense": lambda: F.conv2d(x, w, b, s, pad),
                **{name: (lambda o=o: gated_conv2d_native(x, w, layers[o], b, ones, (s, s), (pad, pad),
                                                          (1, 1), gc.TOPK, 0.0, keep, 0))
                   for name, o in ORIENTS.items()},
                "gather": lambda: [F.conv2d(x[i:i + 1, j], w[:, j], b, s, pad)
                                   for i, j in enumerate(idx)],
            }
            t = time_interleaved(cands, rounds=args.rounds, progress=False)
            d = t["dense"].median
            rows.append([f"{cin}->{cout} {k}x{k}/{s}", f"{hw}x{hw}", d,
                         *(f"{t[c].median:.3f} ({d / t[c].median:.2f}x)" for c in (*ORIENTS, "gather"))])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"half the input channels kept (ideal: 2.00x)")
    print(tabulate(rows, headers=["layer", "input", "dense ms", *(f"native {o}" for o in ORIENTS),
                                  "gather (oneDNN)"], floatfmt=".3f", tablefmt="github"))
    return 0


def gather_table(args: argparse.Namespace) -> int:
    """Dense oneDNN vs the gather strategy with PyTorch's selection vs with the C selection."""
    if not _native_built():
        return 1
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for cin, cout, k, hw in GATHER_CONVS:
            x = torch.randn(1, cin, hw, hw, generator=g).relu()
            w, b = torch.randn(cout, cin, k, k, generator=g) * 0.05, torch.randn(cout, generator=g)
            keep, p, ones = cin // 2, k // 2, torch.ones(cin)
            cands = {
                "dense": lambda: F.conv2d(x, w, b, 1, p),
                "pytorch": lambda: gc.gated_conv2d_loop(x, w, b, ones, 1, 1, p, p, 1, 1, gc.TOPK, 0.0,
                                                        keep, gc.SALIENCY_L2),
                "c": lambda: gated_conv2d_gather_native(x, w, b, ones, (1, 1), (p, p), (1, 1), gc.TOPK,
                                                        0.0, keep, gc.SALIENCY_L2),
            }
            t = time_interleaved(cands, warmup=3, rounds=args.rounds, progress=False)
            d = t["dense"].median
            rows.append([f"{cin}->{cout} {k}x{k}", f"{hw}x{hw}", d,
                         *(f"{t[c].median:.3f} ({d / t[c].median:.2f}x)" for c in ("pytorch", "c"))])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
          f"half the input channels kept (ideal: 2.00x)")
    print(tabulate(rows, headers=["layer", "input", "dense ms", "gather, PyTorch selection",
                                  "gather, C selection"], floatfmt=".3f", tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
