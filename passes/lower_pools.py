"""Lower max-pooling to the eager CPU kernel that runs it fastest.

Non-overlapping pools (VGG's 2x2/2) become :class:`~ispc.modules.StridedMaxPool2d` (elementwise
maxima of strided views); other pools (ResNet's 3x3/2 stem) :class:`~ispc.modules.ChannelsLastMaxPool2d`.

A lowering, not a gating decision: it changes no result, and :func:`ispc.benchmark.dense_baseline`
runs it too, so measured speed-ups stay gating's alone. Functional ``F.max_pool2d`` calls in a
model's ``forward`` are left as they are (only modules are swapped).
"""
from __future__ import annotations

from torch import fx, nn

from ispc.modules import StridedMaxPool2d, fast_max_pool

from .base import PassState, records, register_pass, replace_submodule

__all__ = ["lower_pools"]


@register_pass("lower_pools")
def lower_pools(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Swap each ``nn.MaxPool2d`` (exact type, no ``return_indices``) for the faster equivalent
    module under the same name."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.MaxPool2d or mod.return_indices:
            continue
        fast = fast_max_pool(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
        replace_submodule(gm, node.target, fast)
        strided = type(fast) is StridedMaxPool2d
        records(node).lowered = "strided_max_pool" if strided else "channels_last_max_pool"
    return gm
