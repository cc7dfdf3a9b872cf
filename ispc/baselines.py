"""Baselines ispc is measured against.

:func:`static_prune` is the *static* channel-pruning baseline at equal MACs: every input uses the
same input channels at a layer, namely those with the highest mean saliency on the calibration data
(what a static pruner that looks at activations would keep). Comparing it with ispc at the same
per-layer kept fractions shows what instance-wise (dynamic) gating buys over pruning once for all
inputs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .compiled import CompiledModel
from .config import GatingConfig, checked_options
from .errors import ConfigError, DataError
from .observers import SaliencyStats
from .passes import records, resolve_padding, run_passes
from .passes.base import replace_submodule
from .passes.prune_dead import producer_of, slice_conv
from .pipeline import build_report, check_config, run
from .report import Report

__all__ = ["StaticConv2d", "StaticPrunedModel", "static_prune", "static_channels", "kept_count",
           "STATIC_NOTE"]

#: the per-layer note of a statically pruned layer (in the report row's ``reason``)
STATIC_NOTE = "static: same channels for every input"


class StaticConv2d(nn.Module):
    """A convolution that always reads the same subset ``index`` of its input channels.

    Holds the (BatchNorm-folded) weight sliced to the kept input channels, ``(Cout, K, kh, kw)``;
    ``forward(x) = conv2d(x.index_select(1, index), weight, bias)``, which equals the dense
    convolution of ``x * m`` for the fixed 0/1 channel mask ``m`` (see :meth:`kept_mask`).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, index: Tensor, *,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError("StaticConv2d needs a 4-d conv weight")
        out_c, in_c = int(weight.shape[0]), int(weight.shape[1])
        index = torch.as_tensor(index, dtype=torch.long).flatten().sort().values
        if index.numel() == 0 or index.numel() > in_c or bool((index < 0).any()) or \
                bool((index >= in_c).any()) or index.unique().numel() != index.numel():
            raise ValueError(f"index must hold 1..{in_c} distinct channels in [0, {in_c})")
        index = index.to(weight.device)
        self.register_buffer("index", index)
        self.weight = nn.Parameter(weight.detach().index_select(1, index).clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stride = tuple(int(v) for v in stride)
        self.padding = tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)
        self.in_channels, self.out_channels = in_c, out_c
        self.full = index.numel() == in_c  # every channel kept: skip the gather
        #: the input already holds only the kept channels, in ``index`` order (the layer that
        #: computes them was pruned to them: see static_prune)
        self.prefiltered = False

    @property
    def k(self) -> int:
        """Input channels kept (the same for every input)."""
        return int(self.index.numel())

    def forward(self, x: Tensor) -> Tensor:
        if not (self.full or self.prefiltered):
            x = x.index_select(1, self.index)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    groups = 1

    def sliced(self, *, out_keep: Tensor) -> StaticConv2d:
        """A copy that computes only the ``out_keep`` output channels (the same input channels)."""
        w = torch.zeros(self.out_channels, self.in_channels, *self.weight.shape[2:],
                        dtype=self.weight.dtype, device=self.weight.device)
        w[:, self.index] = self.weight.detach()
        b = self.bias.detach()[out_keep] if self.bias is not None else None
        new = StaticConv2d(w[out_keep], b, self.index, stride=self.stride, padding=self.padding,
                           dilation=self.dilation)
        new.prefiltered = self.prefiltered
        new.ispc_full_channels = getattr(self, "ispc_full_channels",
                                         (self.out_channels, self.in_channels))
        return new

    def kept_mask(self, x: Tensor) -> Tensor:
        """Which input channels each instance of ``x`` keeps (bool, N x C): the same row for all."""
        m = torch.zeros(self.in_channels, dtype=torch.bool, device=x.device)
        m[self.index.to(x.device)] = True
        return m.expand(x.shape[0], -1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, kept={self.k} (static)")


class StaticPrunedModel(CompiledModel):
    """A :class:`CompiledModel` whose pruned layers are :class:`StaticConv2d` (see :func:`static_prune`).

    :meth:`measure` counts the static layers too, so its ``mac_reduction`` and per-layer
    ``kept_fraction`` are comparable with an ispc model's.
    """

    def static_modules(self) -> dict[str, StaticConv2d]:
        """The statically pruned layers by qualified name."""
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, StaticConv2d)}

    @torch.no_grad()
    def measure(self, data: Any, *, progress: bool | None = None) -> dict[str, Any]:
        statics = self.static_modules()
        dense = torch.zeros((), dtype=torch.float64)
        executed = torch.zeros((), dtype=torch.float64)

        def hook(m: StaticConv2d, args: tuple, out: Tensor) -> None:
            nonlocal dense, executed
            kh, kw = m.weight.shape[2:]
            per = int(out.shape[1] * out.shape[2] * out.shape[3] * m.in_channels * kh * kw)
            full_out = getattr(m, "ispc_full_channels", (m.out_channels,))[0]
            dense += per * out.shape[0] * (full_out / m.out_channels)
            executed += per * out.shape[0] * (m.k / m.in_channels)

        hooks = [m.register_forward_hook(hook) for m in statics.values()]
        try:
            res = super().measure(data, progress=progress)
        finally:
            for h in hooks:
                h.remove()
        n = res["samples"]
        dense_per = res["dense_macs"] + float(dense) / n
        exec_per = res["executed_macs"] + float(executed) / n
        layers = dict(res["layers"])
        for name, m in statics.items():
            layers[name] = {"kept_mean": float(m.k), "kept_fraction": m.k / m.in_channels,
                            "kept_p10": float(m.k), "kept_p90": float(m.k)}
        return {**res, "dense_macs": dense_per, "executed_macs": exec_per,
                "mac_reduction": 1.0 - exec_per / dense_per if dense_per else 0.0, "layers": layers}


def static_channels(stats: SaliencyStats, k: int) -> Tensor:
    """The ``k`` channels with the highest mean saliency (ties: lower index first), sorted."""
    order = torch.argsort(-stats.mean.to(torch.float64), stable=True)
    return order[:k].sort().values


def kept_count(fraction: float, channels: int) -> int:
    """The channels a static layer keeps for a kept ``fraction``: rounded, at least one."""
    return int(min(channels, max(1, math.floor(fraction * channels + 0.5))))


@checked_options
def static_prune(model: nn.Module, calibration_data: Any, *,
                 keep_fractions: dict[str, float] | None = None, config: GatingConfig | None = None,
                 match_mac_reduction: float | None = None,
                 progress: bool | None = None) -> StaticPrunedModel:
    """The static-pruning baseline: per layer, the same top-mean-saliency input channels for all inputs.

    Runs ispc's analysis passes (trace, fold BatchNorm, find sites, calibrate, rank) on a copy of
    ``model`` and replaces each pruned convolution by a :class:`StaticConv2d` that keeps the
    ``round(fraction * C)`` input channels with the highest mean saliency on ``calibration_data``.

    Args:
        model: the trained model (never modified).
        calibration_data: as for :func:`ispc.compile`; required (the channels are chosen from it).
        keep_fractions: layer name -> fraction of input channels to keep, e.g. the per-layer
            ``kept_fraction`` of an ispc model's ``measure()``, to compare at the same MACs; each
            is rounded to a channel count, at least one (a layer ispc skips entirely, fraction 0,
            keeps its top channel). Only the layers named are pruned. Default:
            ``config.keep_ratio`` on every layer ispc would gate.
        config: a :class:`GatingConfig`; its layer selection (``min_channels``, ``include``,
            ``exclude``, ``min_cv``, ``gate_fraction``) and ``saliency`` apply. Its ``mode`` does not.
        match_mac_reduction: scale every fraction by one factor (bisection, each capped at 1) so
            that the pruned model's MAC reduction is this one: a static pruner also removes the
            outputs of the layers computing the channels it drops, so at an ispc point's
            per-layer fractions it runs on fewer MACs than ispc; matched, the two compare at
            equal MACs. Needs ``keep_fractions``.
        progress: show progress bars.

    Returns:
        a :class:`StaticPrunedModel` (an :class:`ispc.CompiledModel`) whose report marks each pruned
        layer ``gated`` with ``k`` kept channels and the note :data:`STATIC_NOTE`.
    """
    cfg = check_config(config)
    if match_mac_reduction is not None:
        if keep_fractions is None:
            raise ConfigError("match_mac_reduction scales keep_fractions: give them too")
        return _matched(model, calibration_data, keep_fractions, cfg, float(match_mac_reduction),
                        progress)
    if calibration_data is None:
        raise DataError("static_prune needs calibration_data: the kept channels are those with the "
                        "highest mean saliency on it")
    if keep_fractions is not None:
        bad = {k: v for k, v in keep_fractions.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ConfigError(f"keep_fractions must be in [0, 1], got {bad}")
    gm, state = run(model, calibration_data, config=cfg, pipeline="inspect", progress=progress)

    candidates = {}
    for node in gm.graph.nodes:
        layer = records(node).layer
        # convolutions (a linear layer over a map's or a token sequence's channels stays dense
        # in this baseline)
        if layer is not None and layer.candidate and node.op == "call_module" and isinstance(
                gm.get_submodule(node.target), nn.Conv2d):
            candidates[layer.name] = node
    if keep_fractions is None:
        plan = {name: cfg.keep_ratio for name, node in candidates.items()
                if records(node).gate is not None and records(node).gate.gated}
    else:
        unknown = sorted(set(keep_fractions) - set(candidates))
        if unknown:
            raise ConfigError(f"keep_fractions names layers that cannot be pruned: {unknown[:5]}; "
                              f"candidates are: {sorted(candidates)[:10]}")
        plan = {name: float(f) for name, f in keep_fractions.items()}

    kept: dict[str, int] = {}
    for name, frac in plan.items():
        node = candidates[name]
        conv: nn.Conv2d = gm.get_submodule(node.target)
        stats: SaliencyStats = records(node).stats
        k = kept_count(frac, conv.in_channels)
        static = StaticConv2d(conv.weight, conv.bias, static_channels(stats, k), stride=conv.stride,
                              padding=resolve_padding(conv), dilation=conv.dilation)
        replace_submodule(gm, node.target, static.to(conv.weight.device))
        kept[name] = k
    pruned = _prune_producers(gm, candidates, kept)
    gm = run_passes(gm, state, ["lower_pools"])  # the same layout lowering as dense and ispc
    gm.recompile()

    report = _static_report(build_report(gm, state), kept)
    if pruned:
        report.notes.append(f"{pruned} output channels that no pruned layer reads were removed from "
                            "the layers computing them (as ispc's prune_dead does for channels no "
                            "input keeps)")
    return StaticPrunedModel(gm, report, cfg, backend="eager")


def _matched(model: nn.Module, data: Any, fractions: dict[str, float], cfg: GatingConfig,
             target: float, progress: bool | None) -> StaticPrunedModel:
    """static_prune at ``fractions`` scaled by the factor that gives MAC reduction ``target``."""
    data = list(data) if not isinstance(data, torch.Tensor) else data  # read several times

    def at(scale: float) -> StaticPrunedModel:
        return static_prune(model, data, config=cfg, progress=progress,
                            keep_fractions={n: min(1.0, f * scale) for n, f in fractions.items()})

    best = at(1.0)
    first = best.report.summary["mac_reduction"]
    if abs(first - target) <= 0.002:
        return best
    # more reduction than the target at the unscaled fractions: the factor is above 1 (up to where
    # every fraction is capped at 1), else below
    top = 1.0 / max(min((f for f in fractions.values() if f > 0), default=1.0), 1e-6)
    lo, hi = (1.0, max(top, 1.0)) if first > target else (0.0, 1.0)
    for _ in range(12):  # MAC reduction falls as the scale grows
        mid = (lo + hi) / 2
        cand = at(mid)
        red = cand.report.summary["mac_reduction"]
        if abs(red - target) < abs(best.report.summary["mac_reduction"] - target):
            best = cand
        if abs(red - target) <= 0.002:
            break
        lo, hi = (mid, hi) if red > target else (lo, mid)
    best.report.notes.append(f"per-layer fractions scaled to match a {target:.1%} MAC reduction "
                             f"({best.report.summary['mac_reduction']:.1%} reached)")
    return best


def _prune_producers(gm: fx.GraphModule, candidates: dict[str, fx.Node], kept: dict[str, int]) -> int:
    """A static pruner removes what it drops from the layer computing it too: where a pruned
    layer's input channels come one for one from a convolution nothing else reads
    (:func:`ispc.passes.prune_dead.producer_of`), that convolution keeps only the channels read."""
    removed = 0
    for name in kept:
        node = candidates[name]
        static: StaticConv2d = gm.get_submodule(node.target)
        prod = producer_of(gm, node)
        if prod is None or static.full:
            continue
        producer = gm.get_submodule(prod.target)
        keep = static.index.cpu()
        replace_submodule(gm, prod.target, slice_conv(producer, keep).to(static.weight.device))
        static.prefiltered = True
        records(prod).pruning = dataclasses.replace(
            records(prod).pruning, out_channels=int(producer.out_channels) - int(keep.numel()))
        removed += int(producer.out_channels) - int(keep.numel())
    return removed


def _static_report(report: Report, kept: dict[str, int]) -> Report:
    """Mark the statically pruned rows and recompute the summary's MACs."""
    for row in report.layers:
        if row.name in kept:
            k = kept[row.name]
            row.gated, row.k, row.threshold = True, k, None
            row.kept_mean = row.kept_p10 = row.kept_p90 = float(k)
            row.reason = STATIC_NOTE
        elif row.gated:
            row.gated = False
            row.threshold = row.k = row.kept_mean = row.kept_p10 = row.kept_p90 = None
            row.reason = "not in keep_fractions (static baseline)"
        if row.macs is not None:
            row.expected_macs = row.macs * (row.kept_fraction if row.gated else 1.0) * (
                1.0 - row.out_pruned / max(row.out_channels, 1))
    s = report.summary
    s["method"] = s["mode"] = "static"
    s["layers_gated"] = sum(r.gated for r in report.layers)
    if s.get("dense_macs"):
        s["expected_macs"] = sum(r.expected_macs for r in report.layers)
        s["mac_reduction"] = 1.0 - s["expected_macs"] / s["dense_macs"]
    report.notes.insert(0, "static pruning baseline: each pruned layer keeps the same input channels "
                           "(highest mean saliency on the calibration data) for every input")
    return report
