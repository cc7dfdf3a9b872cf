"""The op-level timings behind ``lower_pools`` and ``cpu_kernels.im2col`` (CPU, batch 1 unless set).

Interleaved medians (``ispc.benchmark.time_interleaved``) of PyTorch's NCHW max-pool against the
module ``lower_pools`` puts in its place (:class:`ispc.modules.StridedMaxPool2d` for VGG's
non-overlapping 2x2 pools, :class:`ispc.modules.ChannelsLastMaxPool2d` with both layout copies for
ResNet's 3x3/2 stem pool), and of ``F.unfold`` against the strided im2col, on ResNet- and VGG-sized
shapes::

    python examples/kernel_speed.py --threads 2
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from ispc.benchmark import time_interleaved
from ispc.modules import ChannelsLastMaxPool2d, StridedMaxPool2d
from ispc.ops.cpu_kernels import im2col

POOLS = [((64, 112), 3, 2, 1), ((64, 56), 3, 2, 1), ((64, 224), 2, 2, 0), ((256, 56), 2, 2, 0),
         ((512, 14), 2, 2, 0)]
IM2COL = [(32, 56), (64, 28), (128, 14), (256, 7), (32, 224), (64, 112)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, default=1, help="batch of the pooling inputs")
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    raise SystemExit(main())
