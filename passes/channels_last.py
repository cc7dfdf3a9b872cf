"""Run a compiled model's feature maps channels-last (NHWC) on the CPU.

oneDNN convolves the gathered channels of large maps faster in NHWC than in NCHW: VGG-16's
224x224-56x56 layers at half the channels 4-15% faster, its 3-channel stem 1.9x (batch 1, 2-core
Xeon). The layout then has to reach those layers unconverted: PyTorch's convolutions, pools and
elementwise ops keep a channels-last input channels-last, and so do ispc's gather kernel, its
selection and its 2x2 pool (``ispc.ops.native``); a layer on the native kernel reads NCHW (it
converts its input, and its output is NCHW for the layers after it).

This pass inserts a :class:`~ispc.modules.ToMemoryFormat` after each 4-d input and before each
4-d output (callers get their layout back). It runs before ``select_kernels``, which then times
each layer's kernels on the input it will see, layout included, and with ``channels_last=None``
lets its whole-model check time both layouts and keep the faster (``ToMemoryFormat.enabled``).

A model that cannot run channels-last keeps NCHW, with a note: one whose forward raises (a
``.view`` of a map whose memory is not NCHW), or whose outputs differ from NCHW's (code that reads
memory as NCHW whatever the strides: ``as_strided``, a C extension). Layout changes no value: only plain eager CPU calls convert (traced,
exported and ONNX graphs see the identity).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ispc.modules import ToMemoryFormat

from .base import PassState, node_shape, records, register_pass

__all__ = ["channels_last", "layout_converters", "insert_converters", "runs_channels_last",
           "INPUT_CONVERTER", "OUTPUT_CONVERTER"]

#: the submodule names of the two converters
INPUT_CONVERTER = "ispc_to_channels_last"
OUTPUT_CONVERTER = "ispc_to_contiguous"


def layout_converters(gm: fx.GraphModule) -> list[ToMemoryFormat]:
    """The model's :class:`~ispc.modules.ToMemoryFormat` modules (none: it runs NCHW)."""
    return [m for m in gm.modules() if isinstance(m, ToMemoryFormat)]


def _wanted(state: PassState) -> bool:
    cfg = state.config
    if cfg.channels_last is not None:
        return cfg.channels_last
    return cfg.latency_aware and bool(state.calibration_cache)


@register_pass("channels_last")
def channels_last(gm: fx.GraphModule, state: PassState) -> fx.GraphModule:
    """Insert the layout converters where ``GatingConfig.channels_last`` asks (or may, measured)."""
    if not _wanted(state) or layout_converters(gm):
        return gm
    if any(p.is_cuda for p in gm.parameters()):
        if state.config.channels_last:
            state.notes.append("channels_last: the model is on CUDA; its maps stay NCHW")
        return gm
    if not insert_converters(gm):
        return gm
    error = _runs(gm, state)
    if error is not None:
        _remove(gm)
        state.notes.append(f"channels_last: the model does not run channels-last ({error}); its "
                           "maps stay NCHW")
    return gm


def insert_converters(gm: fx.GraphModule) -> bool:
    """Put a channels-last converter after each input and a contiguous one before each output
    (where ShapeProp recorded shapes: only 4-d ones; elsewhere every one, as the converters pass
    anything but a 4-d map through). Returns False (nothing changed) for a graph with no 4-d
    input."""
    graph = gm.graph

    def may_be_map(n: fx.Node) -> bool:
        shape = node_shape(n)
        return len(shape) == 4 if shape is not None else "tensor_meta" not in n.meta

    inputs = [n for n in graph.nodes if n.op == "placeholder" and may_be_map(n)]
    if not inputs:
        return False
    gm.add_module(INPUT_CONVERTER, ToMemoryFormat(True))
    gm.add_module(OUTPUT_CONVERTER, ToMemoryFormat(False))
    for p in inputs:
        with graph.inserting_after(p):
            conv = graph.call_module(INPUT_CONVERTER, (p,))
        conv.meta.update({k: v for k, v in p.meta.items() if k == "tensor_meta"})
        records(conv).layout = "channels_last"
        p.replace_all_uses_with(conv, delete_user_cb=lambda user, c=conv: user is not c)
    out = next(n for n in graph.nodes if n.op == "output")

    def back(a):
        if isinstance(a, fx.Node) and may_be_map(a):
            with graph.inserting_before(out):
                node = graph.call_module(OUTPUT_CONVERTER, (a,))
            node.meta.update({k: v for k, v in a.meta.items() if k == "tensor_meta"})
            return node
        return a

    out.args = fx.node.map_aggregate(out.args, back)
    graph.lint()
    gm.recompile()
    return True


def runs_channels_last(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` converts its inputs to channels-last (converters present and enabled)."""
    return any(m.enabled and m.channels_last for m in layout_converters(gm))


def _runs(gm: fx.GraphModule, state: PassState) -> str | None:
    """None if the graph runs channels-last on the example input and gives what it gives on NCHW
    maps, else what went wrong: an error (a ``.view`` of a map), or different outputs (code that
    reads memory as NCHW whatever the strides, as ``as_strided`` or a C extension may)."""
    example = state.example_inputs
    if example is None:
        return None
    args = [x[:2] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in example]
    converters = layout_converters(gm)
    try:
        with torch.no_grad():
            got = gm(*args)
            for c in converters:
                c.enabled = False
            want = gm(*args)
    except Exception as exc:  # noqa: BLE001 -- any failure means: keep NCHW
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        for c in converters:
            c.enabled = True
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            # float rounding differs between the layouts' kernels; a gate may flip on a near tie
            # (then NCHW is kept: a missed speed-up, never a wrong answer)
            scale = float(b.abs().max()) if b.numel() else 0.0
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(scale, 1e-6)):
                diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
                return f"its outputs differ from NCHW's by up to {diff:.3g}"
    return None


def _remove(gm: fx.GraphModule) -> None:
    """Take the converters out of the graph again."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in (INPUT_CONVERTER, OUTPUT_CONVERTER):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name in (INPUT_CONVERTER, OUTPUT_CONVERTER):
        if hasattr(gm, name):
            delattr(gm, name)
    gm.recompile()
