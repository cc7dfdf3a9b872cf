"""``tune``: :func:`ispc.tune` on a CIFAR-10 checkpoint, the way a user would run it, then the test
set. The search sees only training images: it calibrates on the first ``--calibration-size``
images of a fixed shuffle of the training split (the same ones ``evaluate`` calibrates on) and
measures top-1 on the next ``--val-size`` (never the test set), per image, so that each candidate
must clear the budget by a margin for that sample's noise (``--confidence``); the returned model is then
evaluated on all test images (top-1, and MACs executed on them). ``--static`` runs the same search
for static pruning. A search that ``--time-budget`` stops writes nothing but its cache
(``--cache``): the same command again replays what it evaluated and goes on.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import ispc
from ispc.benchmark import benchmark
from ispc.datasets import CIFAR10, CIFAR10Loader
from ispc.errors import ConfigError
from ispc.tune import TARGETS

from .common import add_common_options, evaluate_top1, open_checkpoint, subset_loader
from .evaluate import SPEED_IMAGES

__all__ = ["split_train", "run_tune", "add_parser"]


def split_train(data: CIFAR10, calibration: int, validation: int, *, batch_size: int,
                device: torch.device, seed: int = 0) -> tuple[CIFAR10Loader, CIFAR10Loader]:
    """Calibration and validation loaders over disjoint training images: the first
    ``calibration`` and the next ``validation`` of a fixed (``seed``) shuffle of the split (the
    calibration set is the one ``subset_loader(data, "train", calibration)`` gives)."""
    x, y = data.arrays("train")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if calibration + validation > x.shape[0]:
        raise ConfigError(f"--calibration-size + --val-size is {calibration + validation}, more than "
                          f"the {x.shape[0]} training images")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    loaders = []
    for idx in (order[:calibration], order[calibration:calibration + validation]):
        idx = idx.sort().values
        loaders.append(CIFAR10Loader(x[idx], y[idx], batch_size=batch_size, train=False, shuffle=False,
                                     seed=seed, device=device, drop_last=False, mean=data.mean,
                                     std=data.std))
    return loaders[0], loaders[1]


def run_tune(model: torch.nn.Module, calibration: Any, validation: Any, test: Any, *,
             mode: str, target: str, max_drop: float, static: bool, time_budget_s: float | None,
             cache: str | None, progress: bool, seed: int = 0,
             confidence: float = 0.9) -> dict[str, Any]:
    """One search and its test-set figures (top-1 and test MAC reduction as fractions, like the
    other CIFAR results; the search's own metric is top-1 in percent)."""
    t0 = time.monotonic()
    result = ispc.tune(model, calibration, evaluate=ispc.tune.top1(validation, per_sample=True),
                       max_drop=max_drop, target=target, config=ispc.GatingConfig(mode=mode),
                       static=static, time_budget_s=time_budget_s, cache=cache, seed=seed,
                       progress=progress, confidence=confidence)
    seconds = time.monotonic() - t0
    report = result.tuning
    out: dict[str, Any] = {
        "method": "static" if static else "ispc", "mode": "static" if static else mode,
        "target": target, "max_drop_points": max_drop, "seconds": seconds,
        "evaluations": report.evaluations, "configurations": len(report.trials),
        "stopped": report.stopped, "complete": report.stopped is None,
        "val_top1_dense": report.dense_metric / 100, "val_top1": report.best.metric / 100,
        "val_margin": report.best.margin, "confidence": report.confidence,
        "calibration_mac_reduction": report.best.mac_reduction, "table": report.to_table(),
    }
    if report.stopped is not None:
        return {**out, "report": report.to_dict()}
    dense_top1 = evaluate_top1(model, test)
    measured = result.measure(test, progress=progress)
    first = torch.cat([x for x, _ in test])[:SPEED_IMAGES]  # as evaluate times: real test images
    speed = benchmark(model, result, batch_sizes=(1,), rounds=64, progress=progress, inputs=first)[0]
    out.update({
        "test_top1_dense": dense_top1, "test_top1": evaluate_top1(result, test),
        "test_mac_reduction": measured["mac_reduction"], "speedup_b1": speed.realized_speedup,
        "dense_ms_b1": speed.dense_ms, "ms_b1": speed.gated_ms,
        "layer_keep_ratios": dict(result.config.layer_keep_ratios) if not static else None,
        "keep_fractions": report.keep_fractions, "report": report.to_dict(),
    })
    return out


def _cmd_tune(args: argparse.Namespace) -> int:
    device, checkpoint, model, meta, data = open_checkpoint(args)
    calibration, validation = split_train(data, args.calibration_size, args.val_size,
                                          batch_size=args.batch_size, device=device)
    test = subset_loader(data, "test", None, batch_size=args.batch_size, device=device)
    run = run_tune(model, calibration, validation, test, mode=args.mode, target=args.target,
                   max_drop=args.max_drop, static=args.static, time_budget_s=args.time_budget,
                   cache=args.cache, progress=args.progress, confidence=args.confidence)
    report = run.pop("report")
    print(run.pop("table"))
    if not run["complete"]:
        print(f"\nstopped: {run['stopped']}; run the same command again to go on from the cache "
              f"({args.cache})" if args.cache else f"\nstopped: {run['stopped']}")
        return 3
    print(f"\ntest top-1 {100 * run['test_top1']:.2f}% (dense {100 * run['test_top1_dense']:.2f}%, "
          f"{100 * (run['test_top1'] - run['test_top1_dense']):+.2f}), "
          f"{100 * run['test_mac_reduction']:.1f}% fewer MACs on the test images, batch-1 speed-up "
          f"{run['speedup_b1']:.2f}x; search {run['seconds']:.0f} s, {run['evaluations']} evaluations")
    if args.json:
        path = Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        key = f"{Path(checkpoint).stem}/{run['mode']}/{run['target']}/{args.max_drop:g}"
        results["runs"][key] = {
            "checkpoint": str(checkpoint), "model": meta["model_name"], **run,
            "calibration_images": int(calibration.images.shape[0]),
            "val_images": int(validation.images.shape[0]), "test_images": int(test.images.shape[0]),
            "validation": "train split: the --val-size images after the calibration images in a "
                          "fixed shuffle (seed 0)",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python examples/cifar.py " + " ".join(args.argv),
            "search_report": report}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path} [{key}]")
    return 0


def add_parser(sub: Any) -> None:
    """The ``tune`` command."""
    p = sub.add_parser("tune", help="ispc.tune on a checkpoint (validation split off the training "
                                    "images), then test top-1 and MACs of what it returns")
    p.add_argument("--checkpoint", default=None, help="a checkpoint of these commands (default: as "
                                                      "evaluate)")
    p.add_argument("--mode", choices=("threshold", "topk"), default="threshold")
    p.add_argument("--target", choices=TARGETS, default="macs")
    p.add_argument("--max-drop", type=float, default=0.5, help="top-1 points the search may lose "
                                                               "on the validation images")
    p.add_argument("--static", action="store_true", help="search static pruning instead")
    p.add_argument("--calibration-size", type=int, default=2048)
    p.add_argument("--val-size", type=int, default=20000,
                   help="training images (after the calibration ones) the metric runs on")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--confidence", type=float, default=0.9,
                   help="one-sided confidence that a result's drop is within --max-drop given the "
                        "validation images' noise (ispc.tune's confidence; 0.5: point estimate)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    p.add_argument("--cache", default=None, help="the search's cache file (resumable)")
    p.add_argument("--json", default=None, help="add the run to this results file")
    add_common_options(p)
    p.set_defaults(func=_cmd_tune)
