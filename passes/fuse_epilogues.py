"""Fuse the residual add and the activation that follow a gated layer into the layer.

After ``conv -> add(residual) -> relu`` (a ResNet block's end) or ``conv -> relu`` (its middle), the
add and the ReLU each make one more pass over the output in memory. On the native CPU kernel a
gated layer can apply both as it stores its results (:meth:`~ispc.ops.native.NativeLayer.gated`),
which saves what no gate does. Measured (batch 1, 2-core AMD EPYC, ``benchmarks/fusion_ab.py
--rounds 300``, two runs): ResNet-50 1.026-1.030x of unfused, MobileNetV2 1.022-1.026x, ResNet-18
1.00x. Before the channel-lane kernel wrote its tiles with vector stores it did not pay (the
scalar per-element epilogue cost what the saved passes gained), and it was off by default; it is
on now (``GatingConfig.fuse_epilogues``). Exact:
the layer computes ``act(conv + bias + residual)`` in that order, as the unfused graph did, and
every other path (autograd, export, ONNX, CUDA) runs the same ops in PyTorch
(:meth:`~ispc.modules.GatedConv2d._epilogue`).

A node is fused only when it is the single user of what it consumes (nothing else reads the
conv's output before the add or activation), and an in-place add only when it writes into the
conv's output, not into the residual (whose other readers would otherwise lose the update).
Runs last, after kernels are chosen and thresholds refined, when ``GatingConfig.fuse_epilogues``.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ispc.modules import ChannelsLastMaxPool2d, GatedConv2d, NhwcDenseConv2d, StridedMaxPool2d
from ispc.records import KEY, Epilogue

from .base import PassState, module_call_counts, records, register_pass

__all__ = ["fuse_epilogues", "activation_of", "residual_of"]

_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_INPLACE_ADDS = {operator.iadd, torch.ops.aten.add_.Tensor}
_ACT_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu6: "relu6",
                  torch.ops.aten.relu.default: "relu", torch.ops.aten.relu_.default: "relu",
                  torch.ops.aten.relu6.default: "relu6"}
_HARDTANH = {torch.ops.aten.hardtanh.default, F.hardtanh}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def activation_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The fusable activation ``node`` applies to its first argument, or None."""
    if node.op == "call_module":
        return _ACT_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function" and node.target in _HARDTANH:  # hardtanh(x, 0, 6) is ReLU6
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return "relu6" if (lo, hi) == (0.0, 6.0) and set(node.kwargs) <= {"min_val", "max_val",
                                                                          "inplace"} else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target] if len(node.args) == 1 and set(node.kwargs) <= {"inplace"} \
            else None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 \
            and not node.kwargs:
        return _ACT_METHODS[node.target]
    return None


def residual_of(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is a plain add of ``src`` and a tensor node, else None."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.target in _INPLACE_ADDS:  # a += b: fusable only when it updates src itself
        return b if a is src and isinstance(b, fx.Node) and b is not src else None
    if node.target not in _ADDS:
        return None
    other = b if a is src else a if b is src else None
    return other if isinstance(other, fx.Node) and other is not src else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].args.count(node) == 1 else None


@register_pass("fuse_epilogues")
def fuse_epilogues(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Rewrite ``act(add(gated(x), r))``, ``add(gated(x), r)`` and ``act(gated(x))`` into one call
    ``gated(x, r)`` of a :class:`GatedConv2d` (or an :class:`NhwcDenseConv2d`, ungated on the
    same kernels) whose epilogue adds ``r`` and applies ``act``."""
    if not state.config.fuse_epilogues:
        return gm
    calls = module_call_counts(gm)
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1:
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, (GatedConv2d, NhwcDenseConv2d)) or mod.act or mod.residual_add \
                or len(node.args) != 1 or node.kwargs or getattr(mod, "keeps_all", False):
            continue  # a layer that keeps every channel is the dense conv: nothing to gain
        chain, residual, act = [node], None, None
        user = _only_user(node)
        if user is not None and (r := residual_of(user, node)) is not None:
            chain.append(user)
            residual, user = r, _only_user(user)
        if user is not None and (a := activation_of(gm, user)) is not None:
            chain.append(user)
            act = a
        if len(chain) == 1:
            continue
        tail = chain[-1]
        with gm.graph.inserting_before(tail):  # the residual is defined before the add that read it
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            new = gm.graph.call_module(node.target, args)
        new.meta.update({**tail.meta, KEY: records(node).copy()})
        records(new).epilogue = Epilogue(residual=residual is not None, act=act)
        tail.replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        mod.residual_add, mod.act = residual is not None, act
        fused += 1
    moved = _acts_into_pools(gm, calls)
    if fused or moved:
        gm.graph.lint()
        gm.recompile()
    if fused:
        state.notes.append(f"fused the residual add and/or activation after {fused} gated "
                           "layer(s) into their epilogues (fuse_epilogues)")
    if moved:
        state.notes.append(f"moved {moved} activation(s) after the max-pool that "
                           "reads them, into the pool's pass (fuse_epilogues)")
    return gm


def _acts_into_pools(gm: fx.GraphModule, calls: dict[str, int]) -> int:
    """``pool(act(y))`` (and ``act(pool(y))``, the order exported graphs hold) -> ``pool_act(y)``
    for a :class:`StridedMaxPool2d` or :class:`ChannelsLastMaxPool2d` called once: the max commutes
    with ReLU/ReLU6 (exact), so the activation costs no pass of its own; the gated layer or
    activation node that applied it stops doing so. VGG-16 has five such pools, ResNet one after
    its stem; where the layer before one runs on oneDNN, its ReLU was a pass over the whole
    unpooled map."""
    moved = 0
    for pool_node in list(gm.graph.nodes):
        if pool_node.op != "call_module" or calls.get(pool_node.target) != 1 \
                or len(pool_node.args) != 1 or pool_node.kwargs:
            continue
        pool = gm.get_submodule(pool_node.target)
        src = pool_node.args[0]
        if type(pool) not in (StridedMaxPool2d, ChannelsLastMaxPool2d) or pool.act \
                or not isinstance(src, fx.Node):
            continue
        after = _only_user(pool_node)
        if after is not None and (act := activation_of(gm, after)) is not None \
                and after.args[0] is pool_node:  # act(pool(y)), as exported graphs hold it
            pool.act = act
            after.replace_all_uses_with(pool_node)
            gm.graph.erase_node(after)
        elif _only_user(src) is not pool_node:
            continue
        elif src.op == "call_module" and calls.get(src.target) == 1 and isinstance(
                mod := gm.get_submodule(src.target), GatedConv2d) and mod.act and not mod.residual_add:
            pool.act, mod.act = mod.act, None  # the gated layer's fused activation
            records(src).epilogue = dataclasses.replace(records(src).epilogue or Epilogue(), act=None)
        elif (act := activation_of(gm, src)) is not None and isinstance(x := src.args[0], fx.Node) \
                and _only_user(x) is src:  # a plain activation node (in place or not) alone on x
            pool.act = act
            pool_node.args = (x,)
            gm.graph.erase_node(src)
        else:
            continue
        records(pool_node).epilogue = Epilogue(act=pool.act)
        moved += 1
    return moved
