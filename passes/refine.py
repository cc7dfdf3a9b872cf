"""Refine thresholds with the gates in place.

Thresholds chosen on the dense model drift once upstream layers are gated: a layer then sees
inputs computed from fewer channels. This pass re-runs the cached calibration inputs through the
gated graph and re-chooses each threshold on the saliency it now sees, ``calibration_rounds``
times, so the kept fraction on real inputs matches ``keep_ratio`` (per layer, or over the gated
layers' MACs with ``allocation="global"``), or a layer's own ratio from ``layer_keep_ratios``.
Topk gates keep exactly k and need no refinement.
"""
from __future__ import annotations

import torch
from torch import fx

from ispc.config import GatingConfig
from ispc.distributed import gather_rows
from ispc.modules import GatedConv2d, gate_input
from ispc.ops.gated_conv import channel_saliency

from .base import PassState, apply_gate, records, register_pass, run_with_pre_hooks
from .rank import choose_threshold, global_thresholds, kept_counts, layer_weight

__all__ = ["refine_thresholds", "refine_rounds"]


def refine_rounds(gm: fx.GraphModule, nodes: dict[str, fx.Node], cfg: GatingConfig,
                  inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cfg.calibration_rounds`` rounds of re-choosing the thresholds of the gated layers
    ``nodes`` (name -> node) on what ``inputs`` make them see; writes their gates and modules.
    Returns the saliency rows of the last round (name -> rows), which ``ispc.tune`` reuses."""
    ratios = {name: cfg.layer_keep_ratio(records(node).layer.name) if records(node).layer else None
              for name, node in nodes.items()}
    pooled = [name for name in nodes if ratios[name] is None]  # the global cut's layers
    samples: dict[str, torch.Tensor] = {}
    for _ in range(cfg.calibration_rounds):
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in nodes}

        def hook(name: str, m: GatedConv2d, args: tuple) -> None:
            rows[name].append(channel_saliency(gate_input(m, args[0]), m.scale,
                                               0 if m.saliency != "l1" else 1)
                              .float().cpu())

        run_with_pre_hooks(gm, list(nodes), hook, inputs)
        samples = {name: gather_rows(torch.cat(rows[name])) for name in nodes}
        shared = {}
        if cfg.allocation == "global":
            shared = global_thresholds({n: samples[n] for n in pooled},
                                       {n: layer_weight(nodes[n]) for n in pooled}, cfg.keep_ratio)
        for name, node in nodes.items():
            sample = samples[name]
            keep = ratios[name] if ratios[name] is not None else cfg.keep_ratio
            threshold = shared[name] if name in shared else choose_threshold(sample, keep)
            gate = records(node).gate.with_kept(kept_counts(sample, "threshold", threshold, 0),
                                                threshold=threshold)
            apply_gate(node, gate, gm.get_submodule(name))
    return samples


@register_pass("refine")
def refine_thresholds(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Re-choose every threshold-mode gate on the inputs it sees in the gated graph."""
    cfg = state.config
    if cfg.mode != "threshold" or not state.calibration_cache or cfg.keeps_everything:
        return gm
    nodes = {n.target: n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GatedConv2d)}
    if not nodes or frozenset(nodes) == state.refined_gates:
        return gm
    state.refined_gates = frozenset(nodes)
    refine_rounds(gm, nodes, cfg, state.calibration_cache)
    note = (f"thresholds refined over {cfg.calibration_rounds} round(s) with the gates in place, on "
            f"{sum(int(x.shape[0]) for x in state.calibration_cache)} cached calibration inputs")
    if note not in state.notes:  # the pipeline refines again if kernel selection un-gated layers
        state.notes.append(note)
    return gm
