"""Hand saliency sums from the native layer that writes a map to the gated layers that read it.

A gated channels-last layer starts by reading its whole input once for the saliency of each
channel (the sum over positions of ``v*v`` or ``|v|``) before its convolution reads the kept
channels: on MobileNetV2's 1x1 144->24 at 56x56 that pass (1.8 MB) is over half the layer. The
native layer that wrote the map already held every value in registers as it stored them, and its
epilogue can sum them there (:class:`~ispc.ops.native.NhwcConv`'s ``out_sums``, the depthwise 3x3's
too). This pass links such a producer (a :class:`GatedConv2d` on the ``nhwc`` kernel, or an
:class:`NhwcDenseConv2d`, epilogue included) to the gated ``nhwc`` layers that take its output as
their input (:class:`~ispc.modules.SaliencySums`): the producer computes the sums of the kind they
select with, and they select from those. All of a map's gated readers must use one saliency kind
(else none is linked, and each computes its own); a map any op may write in place is not linked.

Exact: the consumer's selection is computed from the same sums as from the map (summed in another
order, in doubles: tested identical against computing its own and the masked-dense reference).
At run time a consumer takes the sums only for the very tensor they were computed from; anything
else (a non-native call, another input) computes its own. Runs after ``fuse_epilogues`` (the sums
are of the values stored, after the residual and activation), in ``compile`` and in ``ispc.load``
(the links are not part of the archive), when ``GatingConfig.hand_sums``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ispc.modules import (SALIENCY_CODES, GatedConv2d, NhwcDenseConv2d, SaliencySums,
                          StridedMaxPool2d, ToMemoryFormat)
from ispc.records import SumsHandoff

from .base import PassState, module_call_counts, node_shape, records, register_pass

__all__ = ["hand_sums", "producer", "consumer"]

_KIND_NAMES = {0: "l2", 1: "l1"}
# ops that read a map without writing it or returning a view of it (a view could be written)
_READERS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, torch.relu,
            torch.nn.functional.adaptive_avg_pool2d, torch.mean}
_READER_MODULES = (GatedConv2d, NhwcDenseConv2d, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool2d, StridedMaxPool2d, nn.Linear)


def producer(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> nn.Module | None:
    """The module of ``node`` when it is a native layer that can compute its output's sums."""
    if node.op != "call_module" or calls.get(node.target) != 1:
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is GatedConv2d and mod.strategy == "nhwc" and mod.prepared is not None:
        return mod
    return mod if type(mod) is NhwcDenseConv2d else None


def consumer(gm: fx.GraphModule, node: fx.Node, src: fx.Node, calls: dict[str, int]) -> GatedConv2d | None:
    """The module of ``node`` when it is a gated ``nhwc`` layer whose input (and nothing else it
    takes) is ``src``, with as many channels as ``src`` has."""
    if node.op != "call_module" or calls.get(node.target) != 1 or not node.args \
            or node.args[0] is not src or src in node.args[1:] or node.kwargs:
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is not GatedConv2d or mod.strategy != "nhwc" \
            or mod.prepared is None or mod.keeps_all:
        return None
    shape = node_shape(src)
    return mod if shape is None or (len(shape) == 4 and shape[1] == mod.in_channels) else None


def _only_reads(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Whether ``user`` reads its operands without writing them or aliasing them."""
    if user.op == "output":
        return True
    if user.op == "call_module":
        mod = gm.get_submodule(user.target)
        return isinstance(mod, _READER_MODULES) and not getattr(mod, "inplace", False) \
            and not isinstance(mod, ToMemoryFormat)
    return user.op == "call_function" and user.target in _READERS and not user.kwargs.get("inplace")


@register_pass("hand_sums", builds=True)
def hand_sums(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Link each native producer to the gated layers reading its output (see the module doc);
    idempotent: links from an earlier run are dropped first."""
    for mod in gm.modules():
        if isinstance(mod, (GatedConv2d, NhwcDenseConv2d)):
            mod.sums_out = None
            if isinstance(mod, GatedConv2d):
                mod.sums_in = None
    for node in gm.graph.nodes:
        if records(node).sums is not None:
            records(node).sums = None
    if not state.config.hand_sums:
        return gm
    calls = module_call_counts(gm)
    linked = mixed = 0
    for node in gm.graph.nodes:
        prod = producer(gm, node, calls)
        if prod is None:
            continue
        readers = [(u, consumer(gm, u, node, calls)) for u in node.users]
        takers = [(u, m) for u, m in readers if m is not None]
        if not takers or not all(m is not None or _only_reads(gm, u) for u, m in readers):
            continue
        kinds = {SALIENCY_CODES[m.saliency] for _, m in takers}
        if len(kinds) != 1:
            mixed += 1
            continue
        link = SaliencySums(kinds.pop())
        prod.sums_out = link
        records(node).sums = SumsHandoff(out_kind=_KIND_NAMES[link.kind],
                                         reads_from=(records(node).sums or SumsHandoff()).reads_from)
        for u, m in takers:
            m.sums_in = link
            rec = records(u).sums or SumsHandoff()
            records(u).sums = SumsHandoff(out_kind=rec.out_kind, reads_from=str(node.target))
            linked += 1
    if linked:
        state.notes.append(f"hand_sums: {linked} gated layer(s) select from the saliency sums the "
                           "layer before them computed in its epilogue (no pass over their input)")
    if mixed:
        state.notes.append(f"hand_sums: {mixed} map(s) read by gated layers of different saliency "
                           "kinds: those layers compute their own sums")
    return gm
