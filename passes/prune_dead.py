"""Prune dead channels: what a gate drops for every input is removed statically, producer included.

A gate decides per input which channels its convolution reads, but the layer that *produces* those
channels computes all of them first. Where a channel is dropped for every calibration input (a
feature-decay model leaves many exactly zero: in a ResNet-20 fine-tuned with it, 80-100% of the
first stage's inner channels), nothing needs it: this pass removes it from the gated layer's input
and, where no other op reads it, from the output of the convolution that computes it. That is the
paper's own rationale applied per channel: a channel whose usage never varies (always off) is
pruned statically, the rest stays dynamic. The gated layers keep their thresholds (each channel is
compared on its own) or ``k`` (at most the channels left).

The producer is found by walking up from the gated layer's input through channel-wise ops without
parameters (activations, dropout, pooling), each read by nothing else, to a ``groups=1``
convolution read by nothing else. A channel tied to a residual add or a concatenation is never
removed from its producer (other readers need it), only skipped by the gate as before.

Runs with ``GatingConfig(prune_dead=True)`` when the gates were calibrated on at least
:data:`MIN_SAMPLES` inputs (fewer could call a channel dead by chance), and never at
``keep_ratio=1.0`` (every channel is kept: the compiled model equals the original).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx, nn

from ispc.modules import GatedConv2d, GatedLinear, full_channels

from .base import (PassState, module_call_counts, records, register_pass, replace_submodule,
                   run_with_pre_hooks)

__all__ = ["prune_dead", "producer_of", "slice_conv", "MIN_SAMPLES"]

#: calibration inputs below which no channel is called dead
MIN_SAMPLES = 100

# channel-wise ops without parameters: removing a channel before them removes it after them
_FREE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                 nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d)
_FREE_FUNCS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
               torch.relu, torch.tanh, F.leaky_relu, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d,
               # the same in exported ATen graphs (capture="export")
               torch.ops.aten.relu.default, torch.ops.aten.gelu.default, torch.ops.aten.silu.default,
               torch.ops.aten.sigmoid.default, torch.ops.aten.hardswish.default,
               torch.ops.aten.hardtanh.default, torch.ops.aten.tanh.default}
_FREE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "clamp",
                 "clamp_min"}


def _free(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":  # (pools lowered by lower_pools are MaxPool2d subclasses)
        return isinstance(gm.get_submodule(node.target), _FREE_MODULES)
    if len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_function":
        return node.target in _FREE_FUNCS
    return node.op == "call_method" and node.target in _FREE_METHODS


def _channels_last_axis(m: nn.Module) -> bool:
    """Whether a layer's channels are its tensors' last axis (a linear layer) or axis 1."""
    return isinstance(m, (nn.Linear, GatedLinear))


def producer_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The convolution (or linear layer) whose output channels are, one for one and read by
    nothing else, the input channels of gated layer ``node``; None if there is none. A linear
    layer's channels are its last axis, a convolution's axis 1: the two never pair up."""
    calls = module_call_counts(gm)
    linear = _channels_last_axis(gm.get_submodule(node.target))
    cur = node.args[0] if node.args else None
    if cur in node.args[1:] or cur in node.kwargs.values():  # also read whole (a fused residual)
        return None
    while isinstance(cur, fx.Node) and len(cur.users) == 1:
        if cur.op == "call_module":
            m = gm.get_submodule(cur.target)
            # a plain or gated convolution or linear layer, or anything else that can drop output
            # channels (on the same axis as the gated layer reads them)
            if (type(m) in (nn.Conv2d, nn.Linear) or hasattr(m, "sliced")) and calls.get(cur.target, 0) == 1:
                ok = getattr(m, "groups", 1) == 1 and _channels_last_axis(m) == linear
                return cur if ok else None
        if not _free(gm, cur):
            return None
        cur = cur.args[0]
    return None


def slice_conv(conv: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of ``conv`` (what :func:`producer_of` returns) computing only its ``keep`` output
    channels; it remembers how many it had (:func:`ispc.modules.full_channels`). Layers with
    their own ``sliced`` (gated, static) keep their gate or index."""
    if hasattr(conv, "sliced"):
        return conv.sliced(out_keep=keep)
    if isinstance(conv, nn.Linear):
        lin = nn.Linear(conv.in_features, int(keep.numel()), bias=conv.bias is not None,
                        device="meta")
        lin.weight = nn.Parameter(conv.weight.detach()[keep].clone())
        if conv.bias is not None:
            lin.bias = nn.Parameter(conv.bias.detach()[keep].clone())
        lin.ispc_full_channels = getattr(conv, "ispc_full_channels",
                                         (conv.out_features, conv.in_features))
        return lin
    new = nn.Conv2d(conv.in_channels, int(keep.numel()), conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device="meta")
    new.weight = nn.Parameter(conv.weight.detach()[keep].clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach()[keep].clone())
    new.ispc_full_channels = full_channels(conv)
    return new


def _kept_counts(gm: fx.GraphModule, names: list[str], cache: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    counts = {n: torch.zeros(gm.get_submodule(n).in_channels, dtype=torch.long) for n in names}

    def hook(name: str, m: GatedConv2d, args: tuple) -> None:
        counts[name] += m.kept_mask(args[0]).sum(0).cpu()

    run_with_pre_hooks(gm, names, hook, cache)
    return counts


@register_pass("prune_dead")
def prune_dead(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Remove channels no calibration input keeps from gated layers and their producers."""
    cfg = state.config
    if not cfg.prune_dead or cfg.keeps_everything or not state.calibration_cache:
        return gm
    seen = sum(int(x.shape[0]) for x in state.calibration_cache)
    nodes = {n.target: n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GatedConv2d)}
    if not nodes:
        return gm
    if seen < MIN_SAMPLES:
        state.notes.append(f"prune_dead: not run, {seen} calibration inputs are too few to call a "
                           f"channel dead (it needs {MIN_SAMPLES})")
        return gm
    counts = _kept_counts(gm, list(nodes), state.calibration_cache)
    removed = layers = 0
    for name, node in nodes.items():
        dead = counts[name] == 0
        prod = producer_of(gm, node)
        if prod is None or not bool(dead.any()):
            continue
        keep = (~dead).nonzero().flatten()
        if keep.numel() == 0:  # nothing is ever kept: leave one channel so every shape stays valid
            keep = torch.zeros(1, dtype=torch.long)
        replace_submodule(gm, prod.target, slice_conv(gm.get_submodule(prod.target), keep))
        replace_submodule(gm, name, gm.get_submodule(name).sliced(in_keep=keep))
        gone = int(dead.numel() - keep.numel())
        records(prod).pruning = dataclasses.replace(records(prod).pruning, out_channels=gone)
        records(node).pruning = dataclasses.replace(records(node).pruning, in_channels=gone)
        removed += gone
        layers += 1
    if removed:
        gm.recompile()
        state.notes.append(f"prune_dead: {removed} channels that no calibration input kept were "
                           f"removed from {layers} gated layers and the layers that compute them "
                           f"({seen} inputs)")
    return gm
