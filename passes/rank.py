"""Rank candidate layers by the CV of their channel saliency and set each gate's budget.

High CV means the layer's channel usage changes from input to input: dynamic gating pays there.
Layers below ``min_cv`` or outside the top ``gate_fraction`` stay dense. For each gated layer the
threshold (threshold mode) or k (topk mode) is chosen from the calibration data so that the layer
keeps ``keep_ratio`` of its input channels on average.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ispc.errors import ConfigError
from ispc.observers import SaliencyStats

from .base import PassState, ispc_meta, register_pass

__all__ = ["rank_layers", "choose_threshold", "choose_k", "kept_counts"]


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


def kept_counts(sample: torch.Tensor, mode: str, threshold: float, k: int) -> torch.Tensor:
    """Number of channels each sampled instance keeps."""
    if mode == "topk":
        return torch.full((sample.shape[0],), float(k))
    if threshold <= 0:
        return torch.full((sample.shape[0],), float(sample.shape[1]))
    return (sample >= threshold).sum(1).float()


@register_pass("rank")
def rank_layers(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Write ``meta["ispc"]["gate"]`` on every candidate conv: cv, rank, gated or why not, budget."""
    cfg = state.config
    candidates = [n for n in gm.graph.nodes if ispc_meta(n).get("layer", {}).get("candidate")]
    if not state.calibrated:
        if cfg.mode == "threshold":
            raise ConfigError("threshold mode needs calibration data to choose per-layer thresholds; "
                              "pass calibration_data, or use GatingConfig(mode='topk') to gate a fixed "
                              "k = keep_ratio * channels per layer without data")
        if cfg.min_cv > 0 or cfg.gate_fraction < 1:
            raise ConfigError("min_cv and gate_fraction select layers by their CV, which needs "
                              "calibration data; pass calibration_data or leave them at their defaults")
        for node in candidates:
            c = ispc_meta(node)["layer"]["in_channels"]
            k = choose_k(c, cfg.keep_ratio, cfg.channel_multiple)
            ispc_meta(node)["gate"] = {"gated": True, "reason": None, "cv": None, "rank": None,
                                       "threshold": None, "k": k, "kept_mean": float(k),
                                       "kept_p10": float(k), "kept_p90": float(k)}
        state.notes.append("compiled without calibration data: topk gating at keep_ratio on every "
                           "eligible layer, no CV ranking; which channels are kept is still chosen "
                           "per input")
        return gm

    cvs = {n: ispc_meta(n)["stats"].layer_cv() for n in candidates}
    order = sorted(candidates, key=lambda n: (-cvs[n], n.name))
    above = [n for n in order if cvs[n] >= cfg.min_cv]
    n_gate = math.ceil(cfg.gate_fraction * len(above) - 1e-9)
    selected = set(above[:n_gate])
    for rank, node in enumerate(order, start=1):
        stats: SaliencyStats = ispc_meta(node)["stats"]
        gate = {"cv": cvs[node], "rank": rank, "gated": node in selected, "reason": None,
                "threshold": None, "k": None, "kept_mean": None, "kept_p10": None, "kept_p90": None}
        if cvs[node] < cfg.min_cv:
            gate["reason"] = f"CV below cut-off ({cvs[node]:.3g} < min_cv={cfg.min_cv})"
        elif node not in selected:
            gate["reason"] = f"outside the top gate_fraction={cfg.gate_fraction} of the CV ranking"
        else:
            sample = stats.sample
            if cfg.mode == "threshold":
                gate["threshold"] = choose_threshold(sample, cfg.keep_ratio)
            else:
                gate["k"] = choose_k(stats.channels, cfg.keep_ratio, cfg.channel_multiple)
            counts = kept_counts(sample, cfg.mode, gate["threshold"] or 0.0, gate["k"] or 0)
            gate["kept_mean"] = float(counts.mean())
            gate["kept_p10"] = float(torch.quantile(counts, 0.1))
            gate["kept_p90"] = float(torch.quantile(counts, 0.9))
        ispc_meta(node)["gate"] = gate
    return gm
