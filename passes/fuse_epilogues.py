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

A gated linear layer also takes the exact GELU after it (ConvNeXt's ``pwconv1``, the
transformers' ``fc1``): the channels-last kernel applies it in its epilogue, saving a pass
over the layer's output (figures in docs/models.md), the other kernels after them in PyTorch. A convolution does not (its kernels
clamp only), nor a max-pool (GELU does not commute with max).

After a gated linear layer on an N x H x W x C map, a ConvNeXt block's layer scale (a constant
per output channel) folds into the layer's weights and the residual add after the permute back to
N x C x H x W becomes its epilogue (:func:`_scale_and_residual`): two passes over the block's
output saved.

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

from ispc.modules import (ChannelsLastMaxPool2d, GatedConv2d, GatedLinear, NhwcDenseConv2d,
                          StridedMaxPool2d)
from ispc.records import KEY, Epilogue

from .base import PassState, module_call_counts, node_shape, records, register_pass

__all__ = ["fuse_epilogues", "activation_of", "gelu_of", "residual_of"]

_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_INPLACE_ADDS = {operator.iadd, torch.ops.aten.add_.Tensor}
_ACT_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu6: "relu6",
                  torch.ops.aten.relu.default: "relu", torch.ops.aten.relu_.default: "relu",
                  torch.ops.aten.relu6.default: "relu6"}
_HARDTANH = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default, F.hardtanh}
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


_GELU_FUNCTIONS = {F.gelu, torch.ops.aten.gelu.default}


def gelu_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"gelu"`` when ``node`` applies the exact (erf) GELU to its first argument, else None: a
    gated linear layer's epilogue takes it (ConvNeXt's ``pwconv1 -> GELU``, the transformers'
    ``fc1 -> GELU``). Apart from :func:`activation_of`: it does not commute with max-pooling."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return "gelu" if type(mod) is nn.GELU and mod.approximate == "none" else None
    if node.op == "call_function" and node.target in _GELU_FUNCTIONS and len(node.args) == 1 \
            and set(node.kwargs) <= {"approximate"} \
            and node.kwargs.get("approximate", "none") == "none":
        return "gelu"
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


@register_pass("fuse_epilogues", builds=True)
def fuse_epilogues(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Rewrite ``act(add(gated(x), r))``, ``add(gated(x), r)`` and ``act(gated(x))`` into one call
    ``gated(x, r)`` of a :class:`GatedConv2d` (or an :class:`NhwcDenseConv2d`, ungated on the
    same kernels) whose epilogue adds ``r`` and applies ``act``."""
    if not state.config.fuse_epilogues:
        return gm
    calls = module_call_counts(gm)
    fused = dense = 0  # dense: of the fused, the ungated layers (the note counts them apart)
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
        if user is not None and ((a := activation_of(gm, user)) is not None or (
                isinstance(mod, GatedLinear) and (a := gelu_of(gm, user)) is not None)):
            chain.append(user)
            act = a
        if len(chain) == 1:
            if isinstance(mod, GatedLinear) and (_act_after_reshape(gm, node)
                                                 or _scale_and_residual(gm, node, mod)):
                fused += 1
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
        dense += isinstance(mod, NhwcDenseConv2d)
    moved = _acts_into_pools(gm, calls)
    if fused or moved:
        gm.graph.lint()
        gm.recompile()
    if fused:
        which = " and ".join(part for n, part in ((fused - dense, f"{fused - dense} gated"),
                                                  (dense, f"{dense} dense native")) if n)
        state.notes.append(f"fused the residual add and/or activation after {which} "
                           "layer(s) into their epilogues (fuse_epilogues)")
    if moved:
        state.notes.append(f"moved {moved} activation(s) after the max-pool that "
                           "reads them, into the pool's pass (fuse_epilogues)")
    return gm


_RESHAPES = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.reshape}


def _act_after_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``act(reshape(linear(x)))`` -> ``reshape(linear_act(x))`` for a gated linear layer (an
    elementwise activation commutes with the reshape; a loaded archive's program holds the
    layer between the reshapes of its map view). Returns whether it fused."""
    shape = _only_user(node)
    if shape is None or shape.args[0] is not node or not (
            (shape.op == "call_function" and shape.target in _RESHAPES)
            or (shape.op == "call_method" and shape.target in ("reshape", "view"))):
        return False
    user = _only_user(shape)
    if user is None or user.args[0] is not shape:
        return False
    act = activation_of(gm, user) or gelu_of(gm, user)
    if act is None:
        return False
    user.replace_all_uses_with(shape)
    gm.graph.erase_node(user)
    gm.get_submodule(node.target).act = act
    records(node).epilogue = Epilogue(act=act)
    return True


_MULS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_PERMUTES = {torch.permute, torch.ops.aten.permute.default}
_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def _permute_dims(node: fx.Node | None) -> tuple[int, ...] | None:
    if node is None:
        return None
    if node.op == "call_function" and node.target in _PERMUTES and len(node.args) == 2:
        return tuple(node.args[1])
    if node.op == "call_method" and node.target == "permute" and len(node.args) >= 2:
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return tuple(dims) if isinstance(dims, (tuple, list)) else None
    return None


def _attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _layer_scale(gm: fx.GraphModule, node: fx.Node | None, src: fx.Node, channels: int,
                 shapes: tuple[tuple[int, ...], ...]) -> tuple[fx.Node, torch.Tensor] | None:
    """``(get_attr node, tensor)`` when ``node`` multiplies ``src`` by a constant of one of
    ``shapes`` (one entry per channel): a layer scale."""
    if node is None or node.op != "call_function" or node.target not in _MULS \
            or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    t = _attr(gm, other.target)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) not in shapes:
        return None
    return other, t.detach()


def _scale_and_residual(gm: fx.GraphModule, node: fx.Node, mod: GatedLinear) -> bool:
    """A ConvNeXt block's end after its gated ``pwconv2`` on an N x H x W x C map: the layer
    scale (``gamma * y`` before or after the permute back to N x C x H x W, as Hugging Face and
    torchvision/timm write it) is folded into the layer's weights and bias (a per-output-channel
    constant: ``gamma (W x + b) = (gamma W) x + gamma b``; the gate reads the layer's input, which
    this does not change), and the residual add after the permute becomes the layer's epilogue,
    the residual read as the N x H x W x C view it is: ``add(r, permute(gamma * pwconv2(x)))`` ->
    ``permute(pwconv2'(x, permute(r)))``. Returns whether it changed the graph (a scale alone is
    folded too)."""
    c = mod.out_channels
    tail = _only_user(node)
    found = _layer_scale(gm, tail, node, c, ((c,), (1, c), (1, 1, c), (1, 1, 1, c)))
    if found is None and tail is not None and _permute_dims(tail) == _TO_NCHW \
            and tail.args[0] is node:
        perm, tail = tail, _only_user(tail)
        found = _layer_scale(gm, tail, perm, c, ((c, 1, 1), (1, c, 1, 1)))
    if found is None:
        return False
    gamma_node, gamma = found
    g = gamma.reshape(-1).to(mod.weight.dtype)
    mod.weight = nn.Parameter(mod.weight.detach() * g[:, None, None, None],
                              requires_grad=mod.weight.requires_grad)
    mod.bias = nn.Parameter(mod.bias.detach() * g, requires_grad=mod.bias.requires_grad)
    mod.set_strategy(mod.strategy, mod.orient, winograd=mod.winograd)  # repacked, same kernel
    tail.replace_all_uses_with(tail.args[0] if tail.args[1] is gamma_node else tail.args[1])
    gm.graph.erase_node(tail)
    if not gamma_node.users:
        gm.graph.erase_node(gamma_node)
    perm = _only_user(node)
    if perm is None or _permute_dims(perm) != _TO_NCHW or perm.args[0] is not node:
        return True
    after = _only_user(perm)
    residual = residual_of(after, perm) if after is not None else None
    shape = node_shape(after) if after is not None else None
    if residual is None or shape is None or len(shape) != 4 or node_shape(residual) != shape:
        return True
    with gm.graph.inserting_before(after):  # the residual is defined before the add
        r_nhwc = gm.graph.call_function(torch.ops.aten.permute.default, (residual, list(_TO_NHWC)))
        new = gm.graph.call_module(node.target, (node.args[0], r_nhwc))
        out = gm.graph.call_function(torch.ops.aten.permute.default, (new, list(_TO_NCHW)))
    if "tensor_meta" in node.meta:
        r_nhwc.meta["tensor_meta"] = node.meta["tensor_meta"]
    new.meta.update({**node.meta, KEY: records(node).copy()})
    out.meta.update(after.meta)
    records(new).epilogue = Epilogue(residual=True)
    after.replace_all_uses_with(out)
    for n in (after, perm, node):
        gm.graph.erase_node(n)
    mod.residual_add = True
    return True


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
