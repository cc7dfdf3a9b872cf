"""Rank candidate layers by the CV of their channel saliency and set each gate's budget.

High CV means the layer's channel usage changes from input to input: dynamic gating pays there.
Layers below ``min_cv`` or outside the top ``gate_fraction`` stay dense. For each gated layer the
threshold (threshold mode) or k (topk mode) is chosen from the calibration data so that the layer
keeps ``keep_ratio`` of its input channels on average, or (``allocation="global"``) from one
network-wide cut so that the gated layers together keep ``keep_ratio`` of their MACs. Layers that
``layer_keep_ratios`` names keep their own ratio instead (1.0: left dense), and the global cut
is spread over the others.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import fx

from ispc.errors import ConfigError
from ispc.records import GateDecision

from .base import PassState, records, register_pass

__all__ = ["rank_layers", "choose_threshold", "choose_k", "kept_counts", "global_thresholds",
           "layer_weight", "layer_overrides", "OVERRIDE_DENSE"]

#: why a layer that ``layer_keep_ratios`` keeps at 1.0 is not gated
OVERRIDE_DENSE = "kept dense by layer_keep_ratios (1.0)"


def choose_threshold(sample: torch.Tensor, keep_ratio: float) -> float:
    """Smallest threshold with ``mean(sample >= t) <= keep_ratio`` (ties resolved toward keeping
    fewer); 0.0 keeps everything. Exactly-zero saliencies are always dropped when gating at all."""
    if keep_ratio >= 1.0:
        return 0.0
    v = sample.flatten().sort().values
    if v.numel() == 0:
        return 0.0
    idx = min(int(math.floor((1.0 - keep_ratio) * v.numel())), v.numel() - 1)
    t = float(v[idx])
    if idx > 0 and float(v[idx - 1]) < t:
        # halfway to the next smaller value: the same calibration channels are kept, and an input
        # that reproduces a calibration value exactly does not sit on the boundary
        t = (float(v[idx - 1]) + t) / 2
    return t if t > 0 else float(torch.finfo(torch.float32).tiny)


def choose_k(channels: int, keep_ratio: float, multiple: int = 1) -> int:
    """Channels kept per instance in topk mode: ceil(keep_ratio * C), rounded up to ``multiple``."""
    k = max(1, math.ceil(keep_ratio * channels - 1e-9))
    k = int(math.ceil(k / multiple) * multiple)
    return min(k, channels)


def global_thresholds(samples: dict[Any, torch.Tensor], weights: dict[Any, float],
                      keep_ratio: float) -> dict[Any, float]:
    """Per-layer thresholds from one cut across layers.

    Each layer's saliency rows (instances x channels) are divided by the layer's mean saliency so
    that layers are comparable; every (instance, channel) entry then costs ``weights[layer] /
    (instances * channels)`` (a channel's share of the layer's MACs, averaged over instances). The
    cut ``alpha`` keeps the largest normalized entries whose total cost stays within ``keep_ratio``
    of the total, and layer ``l`` gets threshold ``alpha * mean_l`` (exactly-zero saliencies are
    always dropped, as in :func:`choose_threshold`).
    """
    if keep_ratio >= 1.0 or not samples:
        return {key: 0.0 for key in samples}
    tiny = float(torch.finfo(torch.float32).tiny)
    values, costs, scales = [], [], {}
    for key, s in samples.items():
        s = s.double().flatten(1)
        scales[key] = float(s.mean()) if s.numel() else 0.0
        if scales[key] <= 0:
            continue
        values.append((s / scales[key]).flatten())
        costs.append(torch.full((s.numel(),), float(weights[key]) / s.numel(), dtype=torch.float64))
    if not values:
        return {key: tiny for key in samples}
    v, c = torch.cat(values), torch.cat(costs)
    order = torch.argsort(v, descending=True, stable=True)
    v, c = v[order], c[order].cumsum(0)
    kept = int((c <= keep_ratio * float(c[-1]) * (1 + 1e-12)).sum())
    if kept == 0:
        alpha = float(v[0]) * (1 + 1e-6) + tiny  # nothing fits: keep no channel
    elif kept == v.numel():
        alpha = 0.0
    else:
        hi, lo = float(v[kept - 1]), float(v[kept])
        alpha = (hi + lo) / 2 if hi > lo else hi
    return {key: max(alpha * scales[key], tiny) for key in samples}


def layer_weight(node: fx.Node) -> float:
    """What one gated layer's channels cost in the global allocation: its dense MACs."""
    layer = records(node).layer
    return float((layer.macs or layer.in_channels or 1) if layer is not None else 1)


def kept_counts(sample: torch.Tensor, mode: str, threshold: float, k: int) -> torch.Tensor:
    """Number of channels each sampled instance keeps."""
    if mode == "topk":
        return torch.full((sample.shape[0],), float(k))
    if threshold <= 0:
        return torch.full((sample.shape[0],), float(sample.shape[1]))
    return (sample >= threshold).sum(1).float()


def layer_overrides(gm: fx.GraphModule, cfg: Any) -> dict[fx.Node, float]:
    """Each candidate layer's keep ratio from ``cfg.layer_keep_ratios`` (layers no pattern matches
    are left out). A pattern that matches no candidate is a :class:`ConfigError` naming what it
    matched instead, if anything, and why that cannot be gated."""
    if not cfg.layer_keep_ratios:
        return {}
    layers = [(n, records(n).layer) for n in gm.graph.nodes if records(n).layer is not None]
    candidates = [(n, f) for n, f in layers if f.candidate]
    for pattern, _ in cfg.layer_keep_ratios:
        if any(fnmatch.fnmatchcase(f.name, pattern) for _, f in candidates):
            continue
        others = [f for _, f in layers if fnmatch.fnmatchcase(f.name, pattern)]
        names = [f.name for _, f in candidates]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        what = (f"it matches only {others[0].name!r}, which cannot be gated ({others[0].reason})"
                if others else f"the gateable layers are: {shown or 'none'}")
        raise ConfigError(f"GatingConfig.layer_keep_ratios pattern {pattern!r} matches no gateable "
                          f"layer: {what}; fix the pattern (fnmatch on layer names, e.g. "
                          f"'layer3.*') or remove it")
    out = {}
    for node, facts in candidates:
        ratio = cfg.layer_keep_ratio(facts.name)
        if ratio is not None:
            out[node] = ratio
    return out


@register_pass("rank")
def rank_layers(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Write a :class:`~ispc.records.GateDecision` on every candidate conv: cv, rank, gated or why
    not, budget."""
    cfg = state.config
    candidates = [n for n in gm.graph.nodes
                  if records(n).layer is not None and records(n).layer.candidate]
    overrides = layer_overrides(gm, cfg)
    if not state.calibrated:
        if cfg.allocation == "global":
            raise ConfigError("allocation='global' spreads keep_ratio over layers by their calibration "
                              "saliency; pass calibration_data or use GatingConfig(allocation='layer')")
        if cfg.mode == "threshold":
            raise ConfigError("threshold mode needs calibration data to choose per-layer thresholds; "
                              "pass calibration_data, or use GatingConfig(mode='topk') to gate a fixed "
                              "k = keep_ratio * channels per layer without data")
        if cfg.min_cv > 0 or cfg.gate_fraction < 1:
            raise ConfigError("min_cv and gate_fraction select layers by their CV, which needs "
                              "calibration data; pass calibration_data or leave them at their defaults")
        for node in candidates:
            keep = overrides.get(node, cfg.keep_ratio)
            if keep >= 1.0 and node in overrides:
                records(node).gate = GateDecision(gated=False, reason=OVERRIDE_DENSE)
                continue
            k = choose_k(records(node).layer.in_channels, keep, cfg.channel_multiple)
            records(node).gate = GateDecision(gated=True, k=k).with_kept(torch.tensor([float(k)]))
        state.notes.append("compiled without calibration data: topk gating at keep_ratio on every "
                           "eligible layer, no CV ranking; which channels are kept is still chosen "
                           "per input")
        return gm

    cvs = {n: records(n).stats.layer_cv() for n in candidates}
    order = sorted(candidates, key=lambda n: (-cvs[n], n.name))
    above = [n for n in order if cvs[n] >= cfg.min_cv]
    n_gate = math.ceil(cfg.gate_fraction * len(above) - 1e-9)
    selected = set(above[:n_gate])
    shared: dict[fx.Node, float] = {}
    pooled = [n for n in order if n in selected and n not in overrides]  # the global cut's layers
    if cfg.allocation == "global":
        shared = global_thresholds({n: records(n).stats.sample for n in pooled},
                                   {n: layer_weight(n) for n in pooled}, cfg.keep_ratio)
    for rank, node in enumerate(order, start=1):
        gate = GateDecision(gated=node in selected, cv=cvs[node], rank=rank)
        if cvs[node] < cfg.min_cv:
            gate = gate.ungated(f"CV below cut-off ({cvs[node]:.3g} < min_cv={cfg.min_cv})")
        elif node not in selected:
            gate = gate.ungated(f"outside the top gate_fraction={cfg.gate_fraction} of the CV ranking")
        elif overrides.get(node, 0.0) >= 1.0:
            gate = gate.ungated(OVERRIDE_DENSE)
        else:
            stats = records(node).stats
            sample = stats.sample
            threshold = k = None
            keep = overrides.get(node, cfg.keep_ratio)
            if cfg.mode == "threshold":
                threshold = shared[node] if node in shared else choose_threshold(sample, keep)
            else:
                if node in shared:  # the layer's share of the global cut, as a fixed k
                    keep = float(kept_counts(sample, "threshold", shared[node], 0).mean()) / stats.channels
                k = choose_k(stats.channels, keep, cfg.channel_multiple)
            gate = gate.with_kept(kept_counts(sample, cfg.mode, threshold or 0.0, k or 0),
                                  threshold=threshold, k=k)
        records(node).gate = gate
    return gm
