"""The gated convolution: one opaque operator, ``torch.ops.ispc.gated_conv2d``.

Semantics (DESIGN.md, the contract every kernel is tested against): for instance ``n`` the operator
computes ``conv2d(x[n] * m[n], weight, bias)``, where ``m[n, c]`` is 1 for the channels kept for that
instance and 0 for the dropped ones. Which channels are kept is decided inside the operator from the
per-instance channel saliency, so data-dependent shapes never reach the graph: the fake (meta)
implementation returns the dense output shape, which lets the operator survive torch.fx,
torch.export and torch.compile as a single node.

Every argument is a Tensor, int, float or str (tensors first) so that the schema also suits
TensorRT's plugin generation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ARG_NAMES",
    "THRESHOLD",
    "TOPK",
    "SALIENCY_L2",
    "SALIENCY_L1",
    "conv_out_size",
    "channel_saliency",
    "channel_mask",
    "kept_all",
    "gated_conv2d",
    "gated_conv2d_reference",
    "gated_conv2d_loop",
    "gated_conv2d_grouped",
    "gated_conv2d_fast",
    "BATCHED_MIN_N",
]

THRESHOLD = 0  #: mode: keep channels whose saliency >= threshold (count varies per instance)
TOPK = 1  #: mode: keep the k most salient channels of each instance

#: ``torch.ops.ispc.gated_conv2d``'s arguments, in schema order (what converters read a node by)
ARG_NAMES = ("x", "weight", "bias", "scale", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
             "dil_w", "mode", "threshold", "k", "saliency")
SALIENCY_L2 = 0  #: root mean square over spatial positions (the paper's l2 norm, size-normalized)
SALIENCY_L1 = 1  #: mean absolute value over spatial positions

#: threshold mode: gathered channel counts are rounded up to a multiple of this (zero-padded)
THRESHOLD_BUCKET = 8

#: batches at least this large use the batched (gather + grouped conv) kernel instead of a loop
BATCHED_MIN_N = 2


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def channel_saliency(x: Tensor, scale: Tensor, saliency: int = SALIENCY_L2) -> Tensor:
    """Per-instance channel saliency ``s[n, c]`` (float32), times the per-channel ``scale``."""
    if saliency == SALIENCY_L2:
        hw = x.shape[-1] * x.shape[-2]
        s = torch.linalg.vector_norm(x, ord=2, dim=(-2, -1), dtype=torch.float32)
        s = s * (1.0 / math.sqrt(max(hw, 1)))
    elif saliency == SALIENCY_L1:
        s = x.abs().mean(dim=(-2, -1), dtype=torch.float32)
    else:
        raise ValueError(f"unknown saliency code {saliency}")
    return s * scale.to(torch.float32)


def kept_all(mode: int, threshold: float, k: int, channels: int) -> bool:
    """Whether a gate keeps every one of ``channels`` for every input (it is the dense conv)."""
    return (mode == TOPK and k >= channels) or (mode == THRESHOLD and threshold <= 0.0)


#: the former private name, still read by ``triton_gated_conv`` and ``backends/tensorrt``
_kept_all = kept_all


def channel_mask(x: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
                 saliency: int = SALIENCY_L2) -> Tensor:
    """Boolean mask ``m[n, c]``: which input channels instance ``n`` keeps."""
    n, c = x.shape[0], x.shape[1]
    if kept_all(mode, threshold, k, c):
        return torch.ones(n, c, dtype=torch.bool, device=x.device)
    s = channel_saliency(x, scale, saliency)
    if mode == THRESHOLD:
        return s >= threshold
    if mode == TOPK:
        m = torch.zeros(n, c, dtype=torch.bool, device=x.device)
        if k > 0:
            m.scatter_(1, torch.topk(s, k, dim=1, sorted=False).indices, True)
        return m
    raise ValueError(f"unknown gating mode {mode}")


def _conv(x: Tensor, w: Tensor, b: Tensor, stride, pad, dil, groups: int = 1) -> Tensor:
    return F.conv2d(x, w, b, stride, pad, dil, groups)


def gated_conv2d_reference(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor,
                           stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int,
                           dil_w: int, mode: int, threshold: float, k: int,
                           saliency: int = SALIENCY_L2) -> Tensor:
    """The masked-dense reference: ``conv2d(x * m, weight, bias)``. Slow by design."""
    m = channel_mask(x, scale, mode, threshold, k, saliency)
    return _conv(x * m[:, :, None, None].to(x.dtype), weight, bias, (stride_h, stride_w),
                 (pad_h, pad_w), (dil_h, dil_w))


def _indices(s: Tensor, mode: int, threshold: float, k: int) -> tuple[Tensor, Tensor | None]:
    """Kept channel indices per instance, padded to a common width.

    Returns ``(idx[N, K], valid[N, K] or None)``; ``valid`` is None when every row is full (topk).
    Indices are sorted so gathers walk memory forward.
    """
    if mode == TOPK:
        idx = torch.topk(s, k, dim=1, sorted=False).indices
        return idx.sort(dim=1).values, None
    kept = s >= threshold
    width = int(kept.sum(dim=1).max())
    if width == 0:
        return s.new_zeros((s.shape[0], 0), dtype=torch.long), None
    # kept channels first (by index), dropped ones after: one stable sort of the negated mask
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.gather(kept, 1, order)
    return order, (None if bool(valid.all()) else valid)


def bucket_width(kept: int, channels: int) -> int:
    """Threshold mode's gathered width for ``kept`` channels: rounded up to a multiple of
    :data:`THRESHOLD_BUCKET` (at most ``channels``), the extra channels' inputs zeroed. Exact, and
    oneDNN sees few distinct shapes (its primitive cache would otherwise miss for almost every new
    kept count)."""
    return min(channels, -(-kept // THRESHOLD_BUCKET) * THRESHOLD_BUCKET)


def bias_only(x: Tensor, weight: Tensor, bias: Tensor, stride: tuple[int, int],
              pad: tuple[int, int], dil: tuple[int, int], n: int) -> Tensor:
    """The output of ``n`` instances that keep no channel: the bias at every position (a view)."""
    kh, kw = weight.shape[-2:]
    ho = conv_out_size(x.shape[-2], kh, stride[0], pad[0], dil[0])
    wo = conv_out_size(x.shape[-1], kw, stride[1], pad[1], dil[1])
    return bias.to(x.dtype).view(1, -1, 1, 1).expand(n, weight.shape[0], ho, wo)


def gated_conv2d_loop(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                      stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                      threshold: float, k: int, saliency: int = SALIENCY_L2) -> Tensor:
    """Per-instance kernel: gather the kept input channels and weight slices, run a smaller conv."""
    stride, pad, dil = (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w)
    n, c = x.shape[:2]
    if kept_all(mode, threshold, k, c):
        return _conv(x, weight, bias, stride, pad, dil)
    s = channel_saliency(x, scale, saliency)
    outs = []
    for i in range(n):
        kept = 0
        if mode == TOPK:
            idx = torch.topk(s[i], k, sorted=False).indices.sort().values if k > 0 else None
            kept = k
        else:
            keep = s[i] >= threshold
            kept = int(keep.sum())
            # dropped channels fill the bucket; their inputs are zeroed below
            idx = (torch.sort((~keep).to(torch.uint8), stable=True).indices[:bucket_width(kept, c)]
                   if kept else None)
        if idx is None:
            outs.append(bias_only(x, weight, bias, stride, pad, dil, 1))
            continue
        xs = x[i:i + 1].index_select(1, idx)
        if idx.numel() > kept:
            xs[:, kept:] = 0
        outs.append(_conv(xs, weight.index_select(1, idx), bias, stride, pad, dil))
    return outs[0].contiguous() if n == 1 else torch.cat(outs)


def gated_conv2d_grouped(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                         stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                         threshold: float, k: int, saliency: int = SALIENCY_L2) -> Tensor:
    """Batched kernel: gather each instance's channels, then one grouped conv with groups=N.

    In threshold mode instances keep different numbers of channels; rows are padded to the widest
    and the padded input channels are zeroed, which keeps the result exact.
    """
    stride, pad, dil = (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w)
    n, c, h, w = x.shape
    if kept_all(mode, threshold, k, c):
        return _conv(x, weight, bias, stride, pad, dil)
    cout, _, kh, kw = weight.shape
    s = channel_saliency(x, scale, saliency)
    if mode == TOPK and k <= 0:
        return bias_only(x, weight, bias, stride, pad, dil, n).contiguous()
    idx, valid = _indices(s, mode, threshold, k)
    width = idx.shape[1]
    if width == 0:
        return bias_only(x, weight, bias, stride, pad, dil, n).contiguous()
    xg = torch.gather(x, 1, idx[:, :, None, None].expand(n, width, h, w))
    if valid is not None:
        xg = xg * valid[:, :, None, None].to(x.dtype)
    wg = weight[:, idx]  # (cout, n, width, kh, kw)
    wg = wg.transpose(0, 1).reshape(n * cout, width, kh, kw)
    y = _conv(xg.reshape(1, n * width, h, w), wg, bias.repeat(n), stride, pad, dil, groups=n)
    return y.view(n, cout, *y.shape[-2:])


def gated_conv2d_fast(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                      stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                      threshold: float, k: int, saliency: int = SALIENCY_L2) -> Tensor:
    """Dispatch between the per-instance and the batched kernel by batch size."""
    impl = gated_conv2d_grouped if x.shape[0] >= BATCHED_MIN_N else gated_conv2d_loop
    return impl(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode,
                threshold, k, saliency)


@torch.library.custom_op("ispc::gated_conv2d", mutates_args=())
def gated_conv2d(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int, stride_w: int,
                 pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int, threshold: float, k: int,
                 saliency: int) -> Tensor:
    """Gated 2-d convolution (groups=1, zero padding); see the module docstring."""
    out = gated_conv2d_fast(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                            mode, threshold, k, saliency)
    # a custom op's output must not be a view (the batched kernel reshapes its result): autograd
    # would then forbid the in-place residual add (``x += identity``) models apply after it
    return out if out._base is None else out.clone()


@gated_conv2d.register_fake
def _(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode, threshold, k,
      saliency):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    wo = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    return x.new_empty((n, cout, ho, wo))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, sh, sw, ph, pw, dh, dw, mode, threshold, k, saliency = inputs
    mask = channel_mask(x, scale, mode, threshold, k, saliency)
    ctx.save_for_backward(x, weight, mask)
    ctx.conv = ((sh, sw), (ph, pw), (dh, dw))
    ctx.bias_shape = bias.shape


def _backward(ctx, grad):
    """Gradient of the masked-dense form with the mask held fixed (straight-through for gating)."""
    x, weight, mask = ctx.saved_tensors
    stride, pad, dil = ctx.conv
    xm = x * mask[:, :, None, None].to(x.dtype)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, xm, weight, [weight.shape[0]], list(stride), list(pad), list(dil), False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
    if gx is not None:
        gx = gx * mask[:, :, None, None].to(gx.dtype)
    return (gx, gw, gb) + (None,) * 11


gated_conv2d.register_autograd(_backward, setup_context=_setup_context)
