"""Lower pooling to the eager CPU kernel that runs it fastest.

Non-overlapping max-pools (VGG's 2x2/2) become :class:`~ispc.modules.StridedMaxPool2d` (elementwise
maxima of strided views); other max-pools (ResNet's 3x3/2 stem)
:class:`~ispc.modules.ChannelsLastMaxPool2d` (ispc's native pass on channels-last maps). Global
average pools (``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``: the classifier's input)
become :class:`~ispc.modules.GlobalAvgPool2d` modules (native on channels-last maps).

A lowering, not a gating decision: it changes no result, and :func:`ispc.benchmark.dense_baseline`
runs it too, so measured speed-ups stay gating's alone; ``ispc.load`` runs it on the graph it
rebuilds (whose average pools are ATen calls). Functional ``F.max_pool2d`` calls in a model's
``forward`` are left as they are (only modules are swapped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ispc.modules import GlobalAvgPool2d, StridedMaxPool2d, fast_max_pool

from .base import PassState, records, register_pass, replace_submodule

__all__ = ["lower_pools"]


_AVG_POOLS = {F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
              torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten._adaptive_avg_pool2d.default}


def _global(size) -> bool:
    """Whether an adaptive pool's output size is 1x1."""
    return size == 1 or (isinstance(size, (tuple, list)) and len(size) == 2 and tuple(size) == (1, 1))


@register_pass("lower_pools")
def lower_pools(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Swap each ``nn.MaxPool2d`` (exact type, no ``return_indices``) for the faster equivalent
    module under the same name, and each global average pool (module or function) for a
    :class:`GlobalAvgPool2d`."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _AVG_POOLS and not node.kwargs \
                and len(node.args) == 2 and _global(node.args[1]):
            name = _free_name(gm, "global_avg_pool")
            gm.add_submodule(name, GlobalAvgPool2d())
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            records(new).lowered = "global_avg_pool"
            changed = True
            continue
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.AdaptiveAvgPool2d and _global(mod.output_size):
            replace_submodule(gm, node.target, GlobalAvgPool2d())
            records(node).lowered = "global_avg_pool"
            continue
        if type(mod) is not nn.MaxPool2d or mod.return_indices:
            continue
        fast = fast_max_pool(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
        replace_submodule(gm, node.target, fast)
        strided = type(fast) is StridedMaxPool2d
        records(node).lowered = "strided_max_pool" if strided else "channels_last_max_pool"
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _free_name(gm: fx.GraphModule, stem: str) -> str:
    """``stem``, or ``stem_1``, ``stem_2``...: the first name no attribute of ``gm`` has."""
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    return name
