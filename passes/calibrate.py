"""Calibrate: stream the calibration data and record channel saliency at every candidate site."""
from __future__ import annotations

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ispc.distributed import merge_stats, world_size
from ispc.modules import SALIENCY_CODES, gate_input
from ispc.observers import SaliencyStats
from ispc.ops.gated_conv import channel_saliency

from .base import PassState, records, register_pass

__all__ = ["calibrate", "saliency_scale", "CACHE_BYTES", "CACHE_INPUTS"]

#: at most this many bytes / inputs of calibration data are kept for the passes that must see
#: the data again (select_kernels, refine): enough for stable thresholds, bounded in time and memory
CACHE_BYTES = 1 << 30
CACHE_INPUTS = 1024


def saliency_scale(conv: nn.Module, saliency: str) -> torch.Tensor:
    """Per-input-channel factor of the saliency: ones, or the weight-column norms for
    ``weighted_l2`` (what each input channel can contribute to the layer's output). ``conv``: a
    convolution or a linear layer (its weight ``O x C``)."""
    w = conv.weight.detach()
    if saliency == "weighted_l2":
        return torch.linalg.vector_norm(w.float(), dim=(0, *range(2, w.dim())))
    return torch.ones(w.shape[1], device=w.device)


@register_pass("calibrate")
def calibrate(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Run the calibration batches through ``gm`` with observers on each candidate layer's input
    (a convolution's map, or a linear layer's ``N x ... x C`` input seen as the map it is).

    Writes the ``stats`` record (a :class:`SaliencyStats`) on every candidate conv node.
    Without calibration data this pass does nothing and later passes act without statistics.
    """
    if state.example_inputs is None:
        return gm
    cfg = state.config
    code = SALIENCY_CODES[cfg.saliency]
    hooks = []
    for node in gm.graph.nodes:
        layer = records(node).layer
        if layer is None or not layer.candidate:
            continue
        conv = gm.get_submodule(node.target)
        stats = SaliencyStats(layer.in_channels, cfg.max_calibration_samples)
        records(node).stats = stats
        scale = saliency_scale(conv, cfg.saliency).to(conv.weight.device)

        def hook(mod, args, stats=stats, scale=scale):
            stats.update(channel_saliency(gate_input(mod, args[0]), scale, code))

        hooks.append(conv.register_forward_pre_hook(hook))

    def batches():
        yield state.example_inputs[0]
        if state.calibration is not None:
            yield from state.calibration

    cached = cached_bytes = 0
    try:
        with torch.no_grad():
            bar = tqdm(batches(), desc="ispc: calibrating", unit="batch", disable=not state.progress,
                       leave=False)
            for x in bar:
                gm(x)
                if cached + x.shape[0] <= min(cfg.max_calibration_samples, CACHE_INPUTS) and \
                        cached_bytes + x.numel() * x.element_size() <= CACHE_BYTES:
                    state.calibration_cache.append(x)
                    cached += int(x.shape[0])
                    cached_bytes += x.numel() * x.element_size()
                state.calibration_samples += int(x.shape[0])
                bar.set_postfix(inputs=state.calibration_samples)
    finally:
        for h in hooks:
            h.remove()
    sites = [n for n in gm.graph.nodes if records(n).stats is not None]
    if world_size() > 1:  # every rank ends with the same statistics
        for node, merged in zip(sites, merge_stats([records(n).stats for n in sites])):
            records(node).stats = merged
        state.calibration_samples = merged_count(sites) or state.calibration_samples
    return gm


def merged_count(sites: list[fx.Node]) -> int:
    """Instances seen by all ranks together (from any site's merged moments)."""
    return records(sites[0]).stats.count if sites else 0
