"""Insert the gates: every gated conv becomes one call of ``torch.ops.ispc.gated_conv2d``, every
gated linear layer over a map's or a token sequence's last dimension a :class:`GatedLinear` (the
same operator on the input seen as a channels-last map)."""
from __future__ import annotations

import torch
from torch import fx, nn

from ispc.modules import GatedConv2d, GatedLinear

from .base import PassState, node_shape, records, register_pass, replace_submodule
from .calibrate import saliency_scale

__all__ = ["insert_gates", "resolve_padding"]


def resolve_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Integer padding of a conv (``'same'``/``'valid'`` resolved; symmetric only)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore
    return tuple(int(p) for p in conv.padding)  # type: ignore[return-value]


@register_pass("insert_gates")
def insert_gates(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Swap each gated ``nn.Conv2d`` for a :class:`GatedConv2d` under the same qualified name,
    its threshold or k from the layer's :class:`~ispc.records.GateDecision`."""
    cfg = state.config
    for node in gm.graph.nodes:
        gate = records(node).gate
        if gate is None or not gate.gated:
            continue
        conv: nn.Conv2d = gm.get_submodule(node.target)
        if isinstance(conv, nn.Linear):
            gated = GatedLinear(
                conv.weight, conv.bias, mode=cfg.mode,
                threshold=gate.threshold if gate.threshold is not None else 0.0,
                k=gate.k if gate.k is not None else 0, saliency=cfg.saliency,
                scale=saliency_scale(conv, cfg.saliency))
            shape = node_shape(node.args[0])
            if shape is not None and len(shape) > 2:
                gated.positions = int(torch.tensor(shape[1:-1]).prod())
            replace_submodule(gm, node.target, gated.to(conv.weight.device))
            continue
        gated = GatedConv2d(
            conv.weight, conv.bias, stride=conv.stride, padding=resolve_padding(conv),
            dilation=conv.dilation, mode=cfg.mode,
            threshold=gate.threshold if gate.threshold is not None else 0.0,
            k=gate.k if gate.k is not None else 0, saliency=cfg.saliency,
            scale=saliency_scale(conv, cfg.saliency))
        replace_submodule(gm, node.target, gated.to(conv.weight.device))
    gm.recompile()
    return gm
