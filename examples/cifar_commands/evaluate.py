"""``evaluate``: the dense top-1, then ispc (calibrated on training images only) at each mode,
allocation and keep ratio, and for each threshold-mode point the static-pruning baseline
(:func:`ispc.baselines.static_prune`) at the same MACs: top-1, MAC reduction executed on the test
images, batch-1 speed-up against the dense model. Also the CV rationale per layer (``cv_check``
in the JSON): how much a static mask changes each layer's output, and the top-1 of gating one
layer at a time, dynamically vs statically, against the layer's CV.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import ispc
from ispc.baselines import kept_count, static_channels, static_prune
from ispc.benchmark import benchmark
from ispc.errors import ConfigError
from ispc.feature_decay import default_sites
from ispc.modules import GatedConv2d
from ispc.records import records

from .common import (DEFAULT_CHECKPOINTS, add_common_options, default_checkpoint, evaluate_top1,
                     first_images, open_checkpoint, progress_bar, subset_loader)

__all__ = ["DEFAULT_CHECKPOINTS", "default_checkpoint", "spearman", "negligible_channels",
           "static_error_check", "single_layer_check", "sparsity_sweep", "plot_sweep", "add_parser"]


#: the layer-level check of the CV rationale runs at the threshold point nearest this keep ratio
CV_CHECK_KEEP = 0.5


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None for fewer than 3 pairs or a
    constant input."""
    if len(a) != len(b) or len(a) < 3:
        return None

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # average ranks of ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else None


@torch.no_grad()
def negligible_channels(model: nn.Module, loader: Iterable[Any], *, images: int = 1000,
                        rel: float = 0.01) -> dict[str, Any]:
    """How sparse the model is per instance, before any gating: at every gating site, the fraction
    of (image, input channel) pairs whose RMS is at most ``rel`` times the site's mean channel RMS.

    Feature decay should raise it; it bounds the MAC cut gating can take almost for free.
    """
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in default_sites(model)}
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, a, name=name: rows[name].append(a[0].float().pow(2).mean((2, 3)).sqrt().cpu()))
        for name in rows]
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for x, _ in first_images(loader, images):
            model(x)
            seen += int(x.shape[0])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    layers = {}
    for name, r in rows.items():
        r = torch.cat(r)
        layers[name] = float((r <= rel * r.mean()).float().mean()) if r.numel() else 0.0
    return {"images": seen, "rel": rel, "layers": layers,
            "mean_fraction": sum(layers.values()) / len(layers) if layers else 0.0}


@torch.no_grad()
def static_error_check(compiled: nn.Module, static: nn.Module, loader: Iterable[Any], *,
                       images: int = 256, progress: bool = True) -> dict[str, Any]:
    """Per gated layer: its CV and how much the static mask changes the layer's output.

    For every gated layer of ``compiled`` that ``static`` prunes too, a hook compares on the same
    input ``x`` the layer's output ``module(x)`` (dynamic, per-input mask) with the convolution of
    ``x`` under the static model's fixed mask: ``static_error`` is the mean over images of
    ``||y_static - y_dynamic|| / ||y_dynamic||``. Also recorded against the dense output of the same
    ``x``: ``static_error_dense`` and ``dynamic_error_dense``. The Spearman correlation of CV with
    ``static_error`` (``spearman``) tests the rationale "high CV => static pruning loses more".
    """
    gated = {n: m for n, m in compiled.graph_module.named_modules() if isinstance(m, GatedConv2d)}
    statics = static.static_modules()
    names = [n for n in gated if n in statics]
    sums = {n: torch.zeros(3, dtype=torch.float64) for n in names}

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)).double()

    def hook(m: GatedConv2d, args: tuple, out: torch.Tensor, name: str) -> None:
        x = args[0]
        mask = torch.zeros(m.in_channels, dtype=x.dtype, device=x.device)
        mask[statics[name].index.to(x.device)] = 1
        conv = lambda inp: F.conv2d(inp, m.weight, m.bias, m.stride, m.padding, m.dilation)  # noqa: E731
        y_static, y_dense = conv(x * mask.view(1, -1, 1, 1)), conv(x)
        sums[name] += torch.stack([rel(y_static, out).sum(), rel(y_static, y_dense).sum(),
                                   rel(out, y_dense).sum()]).cpu()

    hooks = [gated[n].register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n in names]
    seen = 0
    try:
        for x, _ in progress_bar(first_images(loader, images), desc="cv check", total=None,
                              enabled=progress):
            compiled(x)
            seen += int(x.shape[0])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n in names:
        s = (sums[n] / max(seen, 1)).tolist()
        rows.append({"layer": n, "cv": compiled.report.layer(n).cv, "static_error": s[0],
                     "static_error_dense": s[1], "dynamic_error_dense": s[2]})
    cvs = [r["cv"] for r in rows]
    return {
        "images": seen,
        "metric": "static_error = mean over images of ||conv(x * static_mask) - gated_conv(x)|| / "
                  "||gated_conv(x)|| at each gated layer's actual input x (l2 over the output tensor)",
        "layers": rows,
        "spearman": spearman(cvs, [r["static_error"] for r in rows]),
        "spearman_excess": spearman(cvs, [r["static_error_dense"] - r["dynamic_error_dense"]
                                          for r in rows]),
    }


@torch.no_grad()
def single_layer_check(compiled: nn.Module, loader: Iterable[Any], *, images: int = 1000,
                       progress: bool = True) -> dict[str, Any]:
    """Per gated layer, alone: top-1 with only that layer gated per input vs statically pruned.

    Every other gated layer runs dense. The static variant keeps, for every input, the layer's
    ``round(kept * C)`` channels with the highest mean calibration saliency, where ``kept`` is the
    fraction the dynamic gate kept on these images: same MACs, same layer. ``gain`` = dynamic
    top-1 - static top-1. The paper's rationale predicts that gain grows with the layer's CV;
    ``spearman`` (CV vs gain) checks it on accuracy, the quantity that matters.
    """
    gm = compiled.graph_module
    gated = compiled.gated_modules()
    stats = {n.target: records(n).stats for n in gm.graph.nodes
             if n.op == "call_module" and n.target in gated}
    batches = list(first_images(loader, images))
    seen = sum(int(x.shape[0]) for x, _ in batches)

    def top1() -> float:
        return sum(int((gm(x).argmax(1) == y).sum()) for x, y in batches) / max(seen, 1)

    saved = {n: (m.mode, m.threshold) for n, m in gated.items()}
    rows = []
    try:
        for m in gated.values():
            m.mode, m.threshold = "threshold", 0.0  # keep every channel: dense
        dense = top1()
        for name in progress_bar(list(gated), desc="single-layer check", total=len(gated), enabled=progress):
            m = gated[name]
            m.mode, m.threshold = saved[name]
            kept: list[torch.Tensor] = []
            hook = m.register_forward_pre_hook(lambda mod, a: kept.append(mod.kept_mask(a[0]).float().mean(1)))
            try:
                dynamic = top1()
            finally:
                hook.remove()
            m.mode, m.threshold = "threshold", 0.0
            fraction = float(torch.cat(kept).mean())
            k = kept_count(fraction, m.in_channels)  # rounded as static_prune rounds
            mask = torch.zeros(m.in_channels)
            mask[static_channels(stats[name], k)] = 1
            hook = m.register_forward_pre_hook(
                lambda mod, a, mask=mask: (a[0] * mask.to(a[0]).view(1, -1, 1, 1),))
            try:
                static = top1()
            finally:
                hook.remove()
            rows.append({"layer": name, "cv": compiled.report.layer(name).cv, "kept_fraction": fraction,
                         "dynamic_top1": dynamic, "static_top1": static, "gain": dynamic - static})
    finally:
        for n, m in gated.items():
            m.mode, m.threshold = saved[n]
    return {"images": seen, "dense_top1": dense, "layers": rows,
            "spearman": spearman([r["cv"] for r in rows], [r["gain"] for r in rows])}


#: test images the batch-1 speed-ups cycle through (the gates' sparsity, and so the speed, is
#: that of real images, not of random inputs)
SPEED_IMAGES = 64


def _speed_inputs(test: Iterable[Any], count: int = SPEED_IMAGES) -> torch.Tensor:
    """The first ``count`` images of ``test`` (batches of ``(images, labels)`` or of images)."""
    got, seen = [], 0
    for batch in test:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        got.append(x[:count - seen])
        seen += got[-1].shape[0]
        if seen >= count:
            break
    return torch.cat(got)


def _speedup_b1(model: nn.Module, candidate: nn.Module, rounds: int, progress: bool,
                inputs: torch.Tensor) -> float:
    return float(benchmark(model, candidate, batch_sizes=(1,), rounds=rounds, progress=progress,
                           inputs=inputs)[0].realized_speedup)


def sparsity_sweep(model: nn.Module, calibration: Iterable[Any], test: Iterable[Any], *,
                   keep_ratios: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7),
                   modes: Iterable[str] = ("threshold", "topk"),
                   allocations: Iterable[str] = ("layer",), saliency: str = "l2",
                   speed_rounds: int = 64, cv_images: int = 256, layer_images: int = 1000,
                   check_data: Iterable[Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """ispc at each (mode, allocation, keep ratio), and static pruning matched to each
    threshold-mode point.

    Every point: top-1 (fraction) on ``test``, ``mac_reduction`` from MACs actually executed on
    ``test`` against dense, and the realized batch-1 speed-up against the BN-folded dense model.
    Static points keep, per layer, the same fraction of channels the ispc point kept on average
    on ``test`` (from ``measure()``), so both run at (nearly) the same MACs.
    """
    check_data = test if check_data is None else check_data
    keep_ratios, modes, allocations = [float(r) for r in keep_ratios], list(modes), list(allocations)
    grid = [(m, a, r) for m in modes for a in allocations for r in keep_ratios]
    thr = [(a, r) for m, a, r in grid if m == "threshold"]
    check_at = min(thr, key=lambda ar: (abs(ar[1] - CV_CHECK_KEEP), ar[0] != "layer", ar[1])) \
        if thr else None
    points: list[dict[str, Any]] = []
    cv_check: dict[str, Any] | None = None
    speed_inputs = _speed_inputs(test)
    for mode, alloc, ratio in progress_bar(grid, desc="ispc vs static", total=len(grid), enabled=progress):
        cfg = ispc.GatingConfig(keep_ratio=ratio, mode=mode, allocation=alloc, saliency=saliency)
        fast = ispc.compile(model, calibration, config=cfg, progress=progress).eval()
        measured = fast.measure(test, progress=progress)
        points.append({"method": "ispc", "mode": mode, "allocation": alloc, "keep_ratio": ratio,
                       "top1": evaluate_top1(fast, test), "mac_reduction": measured["mac_reduction"],
                       "speedup_b1": _speedup_b1(model, fast, speed_rounds, progress,
                                                 speed_inputs)})
        if mode != "threshold":
            continue
        fractions = {n: v["kept_fraction"] for n, v in measured["layers"].items()}
        static = static_prune(model, calibration, keep_fractions=fractions, config=cfg,
                              match_mac_reduction=measured["mac_reduction"], progress=progress).eval()
        points.append({"method": "static", "mode": mode, "allocation": alloc, "keep_ratio": ratio,
                       "top1": evaluate_top1(static, test),
                       "mac_reduction": static.measure(test, progress=progress)["mac_reduction"],
                       "speedup_b1": _speedup_b1(model, static, speed_rounds, progress,
                                                     speed_inputs)})
        if (alloc, ratio) == check_at:
            # the per-layer checks compare one layer's output and turn gates on and off: they need
            # every layer whole (no channel pruned from producers) and without fused epilogues
            whole = ispc.compile(model, calibration, progress=progress,
                                 config=cfg.replace(prune_dead=False, fuse_epilogues=False)).eval()
            cv_check = {"mode": mode, "allocation": alloc, "keep_ratio": ratio,
                        **static_error_check(whole, static, check_data, images=cv_images,
                                             progress=progress),
                        "single_layer": single_layer_check(whole, check_data, images=layer_images,
                                                           progress=progress)}
    return {"points": points, "cv_check": cv_check}


def plot_sweep(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Top-1 against MAC reduction: ispc and static curves per mode, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if result.get("top1_unit", "fraction") == "fraction" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    palette = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b7791f", "#c53030"]
    curves = list(dict.fromkeys((p["mode"], p.get("allocation", "layer")) for p in result["points"]))
    for color, (mode, alloc) in zip(palette * 2, curves):
        name = mode if alloc == "layer" else f"{mode}, {alloc}"
        for method, style, marker in (("ispc", "-", "o"), ("static", "--", "s")):
            pts = sorted((p for p in result["points"] if p["mode"] == mode and p["method"] == method
                          and p.get("allocation", "layer") == alloc), key=lambda p: p["mac_reduction"])
            if pts:
                ax.plot([100 * p["mac_reduction"] for p in pts], [scale * p["top1"] for p in pts],
                        linestyle=style, marker=marker, color=color,
                        label=f"ispc ({name})" if method == "ispc" else f"static (matched to {name})")
    ax.axhline(scale * result["dense_top1"], color="black", linewidth=1, linestyle=":",
               label=f"dense ({scale * result['dense_top1']:.2f}%)")
    ax.set_xlabel("MAC reduction executed on the test images (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{result.get('model', '')}: instance-wise (ispc) vs static pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sweep_tables(result: dict[str, Any]) -> str:
    rows = [[p["method"], p["mode"], p.get("allocation", "layer"), f"{p['keep_ratio']:g}", f"{100 * p['top1']:.2f}",
             f"{100 * (p['top1'] - result['dense_top1']):+.2f}", f"{100 * p['mac_reduction']:.1f}%",
             f"{p['speedup_b1']:.2f}x"] for p in result["points"]]
    text = tabulate(rows, headers=["method", "mode", "allocation", "keep", "top-1 %", "vs dense", "MAC cut",
                                   "speed-up b1"], tablefmt="simple", disable_numparse=True)
    check = result.get("cv_check")
    if check:
        rows = [[r["layer"], f"{r['cv']:.3f}" if r["cv"] is not None else "-",
                 f"{r['static_error']:.4f}", f"{r['static_error_dense']:.4f}",
                 f"{r['dynamic_error_dense']:.4f}"] for r in check["layers"]]
        rho = check["spearman"]
        text += (f"\n\nCV check at {check['mode']} keep {check['keep_ratio']:g} on {check['images']} "
                 "images (rel. output error of each gated layer)\n"
                 + tabulate(rows, headers=["layer", "CV", "static vs dynamic", "static vs dense",
                                           "dynamic vs dense"], tablefmt="simple", disable_numparse=True)
                 + f"\nSpearman(CV, static vs dynamic error) = "
                 + (f"{rho:+.3f}" if rho is not None else "n/a (fewer than 3 layers)"))
        single = check.get("single_layer")
        if single:
            rows = [[r["layer"], f"{r['cv']:.3f}" if r["cv"] is not None else "-",
                     f"{100 * r['kept_fraction']:.0f}%", f"{100 * r['dynamic_top1']:.2f}",
                     f"{100 * r['static_top1']:.2f}", f"{100 * r['gain']:+.2f}"] for r in single["layers"]]
            rho = single["spearman"]
            text += (f"\n\nOne layer gated at a time ({single['images']} images, dense "
                     f"{100 * single['dense_top1']:.2f}%): ispc vs static at the same kept count\n"
                     + tabulate(rows, headers=["layer", "CV", "kept", "ispc top-1", "static top-1",
                                               "ispc - static"], tablefmt="simple", disable_numparse=True)
                     + "\nSpearman(CV, ispc - static top-1) = "
                     + (f"{rho:+.3f}" if rho is not None else "n/a (fewer than 3 layers)"))
    return text


def _cmd_evaluate(args: argparse.Namespace) -> int:
    device, checkpoint, model, meta, data = open_checkpoint(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.calibration_size < 1:
        raise ConfigError(f"--calibration-size must be >= 1, got {args.calibration_size}")
    test = subset_loader(data, "test", args.limit, batch_size=args.batch_size, device=device)
    top1 = evaluate_top1(model, test)
    print(f"{meta['model_name']} {checkpoint}: dense test top-1 {100 * top1:.2f}% "
          f"({test.images.shape[0]} test images)", flush=True)
    # the checks read the first images of their loader: a fixed shuffle, so every class is in them
    # (the stored test split is sorted by class)
    checks = subset_loader(data, "test", max(args.cv_images, args.layer_images),
                            batch_size=args.batch_size, device=device, seed=1, shuffled=True)
    sparse = negligible_channels(model, checks, images=args.layer_images)
    print(f"negligible channels before gating (RMS <= {sparse['rel']:g} x layer mean, "
          f"{sparse['images']} images): {100 * sparse['mean_fraction']:.1f}% on average over "
          f"{len(sparse['layers'])} gating sites", flush=True)
    if args.dense_only:
        return 0
    bad = [r for r in args.keep_ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ConfigError(f"--keep-ratios must be in (0, 1], got {bad}")
    calibration = subset_loader(data, "train", args.calibration_size, batch_size=args.batch_size,
                                 device=device)
    sweep = sparsity_sweep(model, calibration, test, keep_ratios=args.keep_ratios, modes=args.modes,
                           allocations=args.allocations, saliency=args.saliency,
                           speed_rounds=args.speed_rounds, cv_images=args.cv_images,
                           layer_images=args.layer_images, check_data=checks,
                           progress=args.progress)
    result = {"model": meta["model_name"], "checkpoint": str(checkpoint), "top1_unit": "fraction",
              "dense_top1": top1, "test_images": int(test.images.shape[0]),
              "negligible_channels": sparse,
              "calibration_images": int(calibration.images.shape[0]),
              "calibration": "train split, first --calibration-size images of a fixed shuffle "
                             "(seed 0), no augmentation",
              "saliency": args.saliency, "threads": torch.get_num_threads(), "device": str(device), **sweep}
    print(_sweep_tables(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_sweep(result, args.plot)}")
    return 0


def add_parser(sub: Any) -> None:
    """The ``evaluate`` command."""
    p = sub.add_parser("evaluate", help="dense test top-1, then ispc vs static pruning at several "
                                        "keep ratios (top-1, MAC reduction, batch-1 speed-up)")
    p.add_argument("--checkpoint", default=None,
                   help=f"best.pt/final.pt of a run (default {DEFAULT_CHECKPOINTS[0]} if it exists, "
                        f"else {DEFAULT_CHECKPOINTS[1]})")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="save accuracy vs MAC reduction here (needs matplotlib)")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--modes", nargs="+", choices=("threshold", "topk"), default=["threshold", "topk"])
    p.add_argument("--allocations", nargs="+", choices=("layer", "global"), default=["layer", "global"],
                   help="how keep ratios are spread over layers (GatingConfig.allocation)")
    p.add_argument("--saliency", choices=("l2", "l1", "weighted_l2"), default="l2",
                   help="per-instance channel importance (GatingConfig.saliency)")
    p.add_argument("--calibration-size", type=int, default=2048,
                   help="training images ispc calibrates on (default 2048)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on this many test images (a fixed subset; default all)")
    p.add_argument("--speed-rounds", type=int, default=64,
                   help="timing rounds at batch 1 (each on the next of the first 64 test images)")
    p.add_argument("--cv-images", type=int, default=256,
                   help="test images for the per-layer CV vs static-error check")
    p.add_argument("--layer-images", type=int, default=1000,
                   help="test images for the single-layer dynamic-vs-static accuracy check")
    p.add_argument("--dense-only", action="store_true", help="only the dense top-1")
    add_common_options(p)
    p.set_defaults(func=_cmd_evaluate)
