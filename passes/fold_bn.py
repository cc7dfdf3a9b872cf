"""Fold eval-mode BatchNorm into the convolution before it.

After folding, the feature map a gate sees is exactly the one the next layer consumes, and the
dense baseline the gated model is compared with pays no BatchNorm either.
"""
from __future__ import annotations

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import PassState, module_call_counts, records, register_pass, replace_submodule

__all__ = ["fold_batchnorm"]

_BN = (nn.BatchNorm2d,)


@register_pass("fold_bn")
def fold_batchnorm(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Replace ``conv -> bn`` pairs (conv output used only by the BN) by one folded conv."""
    calls = module_call_counts(gm)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(src.target)
        if type(conv) is not nn.Conv2d or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        replace_submodule(gm, src.target, fused)
        node.replace_all_uses_with(src)
        src.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
        records(src).folded_bn = node.target
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm
