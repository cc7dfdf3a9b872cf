"""Train, fine-tune with feature decay, and evaluate CIFAR-10 models.

The models ispc is demonstrated on come from here: a dense run (``train``), then a fine-tune with
the feature-decay regularizer that teaches the network instance-wise channel sparsity
(``finetune``), then ``evaluate``. Runs are resumable, and on the CPU exactly reproducible, from
``last.pt`` because each epoch's data order depends only on (seed, epoch).

    python examples/cifar.py train --model resnet20 --data ../shared/data/cifar10-jpeg.tar.gz \\
        --epochs 40 --out runs/resnet20_dense
    python examples/cifar.py finetune --checkpoint runs/resnet20_dense/final.pt \\
        --feature-decay 3e-4 --lr 0.05 --epochs 12 --data ... --out runs/resnet20_fd
    python examples/cifar.py evaluate --checkpoint runs/resnet20_fd/final.pt --data ... \
        --json eval.json --plot eval.png [--keep-ratios 0.5 0.6 0.7] [--modes threshold topk] \
        [--allocations layer global]

``average`` averages the weights of checkpoints fine-tuned from one parent (a model soup; or one
run's last epochs, as SWA does), re-estimates BatchNorm on training images and saves a checkpoint:

    python examples/cifar.py average runs/a/final.pt runs/b/final.pt --data ... --out soup.pt

``evaluate`` measures the dense top-1 and the fraction of negligible channels at the gating sites,
then ispc (calibrated on training images only) at each mode, allocation and keep ratio, and for each
threshold-mode point the static-pruning baseline (:func:`ispc.baselines.static_prune`) at the same
per-layer kept fractions: top-1, MAC reduction actually executed on the test images, and batch-1
speed-up against the dense model. It also checks the CV rationale per layer (``cv_check`` in the
JSON): how much a static mask changes each layer's output, and the top-1 of gating one layer at a
time, dynamically vs statically, against the layer's CV.

Also runnable as ``python -m ispc.examples.cifar`` once ispc is installed. Accuracies are
fractions in [0, 1] in files and return values. This file is the command line; each command is a
module of ``examples/cifar_commands/`` (``fit``: train and finetune, ``average``, ``evaluate``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file from a checkout: make `ispc` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.cifar_commands import average, evaluate, fit, tune
    from examples.cifar_commands.common import build_model, evaluate_top1, load_checkpoint
    from examples.cifar_commands.common import subset_loader as _subset_loader
    from examples.cifar_commands.fit import TeacherEnsemble
else:
    from .cifar_commands import average, evaluate, fit, tune
    from .cifar_commands.common import build_model, evaluate_top1, load_checkpoint
    from .cifar_commands.common import subset_loader as _subset_loader
    from .cifar_commands.fit import TeacherEnsemble

from ispc.errors import ConfigError, IspcError

# what scripts and the docs import from here (``_subset_loader``: examples/gpu_check.py)
__all__ = ["build_parser", "main", "build_model", "load_checkpoint", "evaluate_top1",
           "TeacherEnsemble", "_subset_loader"]


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` / ``finetune`` / ``average`` / ``evaluate`` command line."""
    parser = argparse.ArgumentParser(prog="cifar.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit.add_parsers(sub)
    average.add_parser(sub)
    evaluate.add_parser(sub)
    tune.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage or data error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if args.command in ("evaluate", "average", "tune") and not args.data:
            raise ConfigError(f"{args.command} needs --data")
        return int(args.func(args))
    except IspcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
