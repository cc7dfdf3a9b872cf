"""Lower max-pooling to the eager CPU layout that runs it fastest.

A lowering, not a gating decision: it changes no result, and :func:`ispc.benchmark.dense_baseline`
runs it too, so measured speed-ups stay gating's alone. Functional ``F.max_pool2d`` calls in a
model's ``forward`` are left as they are (only modules are swapped).
"""
from __future__ import annotations

from torch import fx, nn

from ispc.modules import ChannelsLastMaxPool2d

from .base import PassState, ispc_meta, register_pass, replace_submodule

__all__ = ["lower_pools"]


@register_pass("lower_pools")
def lower_pools(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Swap each ``nn.MaxPool2d`` (exact type, no ``return_indices``) for
    :class:`~ispc.modules.ChannelsLastMaxPool2d` under the same name."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.MaxPool2d or mod.return_indices:
            continue
        fast = ChannelsLastMaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                     ceil_mode=mod.ceil_mode)
        replace_submodule(gm, node.target, fast)
        ispc_meta(node)["lowered"] = "channels_last_max_pool"
    return gm
