"""ispc's graph passes, one per file (imported as ``ispc.passes``), in ``ispc.compile``'s order:

    capture -> lift -> fold_bn -> linear_as_conv -> find_sites -> calibrate -> rank -> insert_gates -> lower_pools
        -> refine -> prune_dead -> channels_last -> select_kernels -> refine -> dense_kernels
        -> fuse_epilogues -> hand_sums -> dense_route

The named pipelines (that list and the others) and why they run in that order are in
:mod:`ispc.pipeline`. Each pass is ``pass_fn(gm, state) -> GraphModule``; see
:mod:`ispc.passes.base`.
"""
from .base import (PASSES, Pass, PassState, apply_gate, apply_kernel, build_passes, records,
                   register_pass, run_passes)
from .capture import capture, trace
from .lift import lift
from .fold_bn import fold_batchnorm
from .linear_as_conv import flattened_map, linear_as_conv
from .find_sites import build_channel_graph, channel_kind, coupling_groups, find_sites
from .calibrate import calibrate, saliency_scale
from .rank import choose_k, choose_threshold, kept_counts, rank_layers
from .insert_gates import insert_gates, resolve_padding
from .lower_pools import lower_pools
from .refine import refine_thresholds
from .prune_dead import prune_dead
from .channels_last import channels_last, layout_converters
from .kernel_costs import predicted_strategy
from .select_kernels import select_kernels
from .dense_kernels import dense_kernels
from .fuse_epilogues import fuse_epilogues
from .hand_sums import hand_sums
from .dense_route import dense_route

__all__ = [
    "PASSES", "Pass", "PassState", "records", "apply_gate", "apply_kernel", "register_pass",
    "run_passes", "build_passes", "capture", "trace", "lift",
    "fold_batchnorm", "linear_as_conv", "flattened_map", "build_channel_graph", "channel_kind",
    "coupling_groups", "find_sites",
    "calibrate", "saliency_scale", "choose_k", "choose_threshold", "kept_counts", "rank_layers",
    "insert_gates", "resolve_padding", "lower_pools", "refine_thresholds", "prune_dead",
    "channels_last", "layout_converters", "select_kernels",
    "predicted_strategy", "dense_kernels", "fuse_epilogues", "hand_sums", "dense_route",
]
