"""nn.Module wrappers around the gated operator, as they appear in a compiled graph."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DataError
from .ops import cpu_kernels as _cpu
from .ops import gated_conv as _gc
from .ops import linear_kernels as _lk
from .ops import native as _native
from .ops import triton_gated_conv as _triton

__all__ = [
    "GatedConv2d", "GatedLinear", "LinearConv2d", "dense_conv", "full_channels", "gate_input",
    "ChannelsLastMaxPool2d", "StridedMaxPool2d", "fast_max_pool", "GlobalAvgPool2d", "MODE_CODES",
    "ACTIVATIONS", "apply_activation", "ToMemoryFormat",
    "SALIENCY_CODES", "ORIENTATIONS", "plain_cpu_call", "NhwcDenseConv2d", "SaliencySums",
    "Watched", "state_generation",
]

MODE_CODES = {"threshold": _gc.THRESHOLD, "topk": _gc.TOPK}
#: largest output (bytes, whole batch) whose residual add and activation the native kernel applies
#: itself; larger ones (batch 32) get them in one pass after it (``native.epilogue``), which
#: measured faster
EPILOGUE_MAX_BYTES = 16 << 20
#: activations a gated layer's epilogue can apply -> the native kernel's clamp range (``gelu``:
#: :class:`GatedLinear` only, applied by the channels-last kernel, else in PyTorch)
ACTIVATIONS = {None: _native.NO_CLAMP, "relu": _native.RELU, "relu6": _native.RELU6,
               "gelu": _native.GELU}


def apply_activation(out: Tensor, act: str | None) -> Tensor:
    """``out`` through the activation named ``act`` (a key of :data:`ACTIVATIONS`), as new
    PyTorch tensors: the fused epilogues' path wherever the C passes do not serve."""
    if act == "relu":
        return torch.relu(out)
    if act == "relu6":
        return F.relu6(out)
    if act == "gelu":
        return F.gelu(out)
    return out
#: the native kernel's orientations by name (what records and reports say) -> its codes
ORIENTATIONS = {"pix": _native.ORIENT_PIX, "co": _native.ORIENT_CO, "full": _native.ORIENT_FULL,
                "cl": _native.ORIENT_CL}
#: weighted_l2 is l2 with the weight-column norms folded into the per-channel scale
SALIENCY_CODES = {"l2": _gc.SALIENCY_L2, "l1": _gc.SALIENCY_L1, "weighted_l2": _gc.SALIENCY_L2}


class SaliencySums:
    """The saliency sums (``[n, c]``, see :class:`~ispc.ops.native.NhwcConv`) a native layer's
    epilogue computed for the output it returned last, handed to the gated layers that read that
    output (``passes/hand_sums.py`` links them): a consumer then selects its channels without a
    pass of its own over its input. A consumer takes the sums only for the very tensor they were
    computed from (the producer's output object, held weakly) and of its own saliency ``kind``; any
    other input, or a producer call that did not run natively, leaves it computing its own. Not a
    module, and not part of any state dict or archive (the pass links a loaded model again)."""

    __slots__ = ("kind", "_last")

    def __init__(self, kind: int) -> None:
        self.kind = int(kind)
        #: (weak reference to the producer's last output, its sums): one tuple, replaced whole
        self._last: tuple | None = None

    def new(self, n: int, c: int) -> Tensor:
        """An (n, c) buffer for the producer's kernel to write the sums into."""
        return torch.empty((n, c), dtype=torch.float32)

    def put(self, out: Tensor, sums: Tensor) -> None:
        """Record ``sums`` as the sums of ``out`` (the producer's output)."""
        self._last = (weakref.ref(out), sums)

    def get(self, x: Tensor, kind: int) -> Tensor | None:
        """The sums of ``x`` of ``kind``, when the producer computed them for this very tensor."""
        last = self._last
        return last[1] if last is not None and kind == self.kind and last[0]() is x else None

    def __getstate__(self) -> dict:  # copies and pickles carry the link, never a stale output
        return {"kind": self.kind}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["kind"])

    def __repr__(self) -> str:
        return f"SaliencySums(kind={self.kind})"


def plain_cpu_call(x: Tensor) -> bool:
    """True for a plain eager CPU tensor: no fake/functional tensor, FX proxy, compiler or tracer.

    Eager-only fast paths take this test, so exported, compiled and ONNX graphs see only the
    plain operator.
    """
    return (type(x) is Tensor and x.is_cpu and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


class _Generation:
    """A counter moved by every change to a :class:`Watched` module (see there)."""

    value = 0


#: the counter itself (its ``value``), for callers that read it without a function call
Generation = _Generation


def state_generation() -> int:
    """The current state generation: unchanged since a reading, no :class:`Watched` module has
    had an attribute, buffer or hook set, nor been moved or cast, in between."""
    return _Generation.value


class Watched(nn.Module):
    """A module whose native call ``ispc.native_plan`` plans ahead: setting an attribute or
    buffer, registering a hook, moving or casting it moves :func:`state_generation` (after the
    change), so a runner re-reads the layers' state only when the generation moved (one integer
    compare per call instead of every layer's attributes). Changes that bypass ``nn.Module``
    (writing ``__dict__`` or ``_buffers`` directly) are not seen."""

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        _Generation.value += 1

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _Generation.value += 1

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        _Generation.value += 1

    def register_forward_hook(self, *args, **kwargs):
        handle = super().register_forward_hook(*args, **kwargs)
        _Generation.value += 1
        return handle

    def register_forward_pre_hook(self, *args, **kwargs):
        handle = super().register_forward_pre_hook(*args, **kwargs)
        _Generation.value += 1
        return handle

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        _Generation.value += 1
        return out


class GatedConv2d(Watched):
    """A convolution that skips, per input, the input channels with negligible saliency.

    Holds the (BatchNorm-folded) weights of the convolution it replaces; its forward is one call of
    ``torch.ops.ispc.gated_conv2d``, so the graph stays a single opaque node per gated layer.
    """

    #: class defaults for instances pickled before these existed
    out_hw: int | None = None
    winograd: bool | None = None
    _nhwc = None
    #: saliency sums handed in from the native layer that writes this layer's input, and out to
    #: the gated layers that read its output (``passes/hand_sums.py``; None: none)
    sums_in: SaliencySums | None = None
    sums_out: SaliencySums | None = None

    def __init__(self, weight: Tensor, bias: Tensor | None, *, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], mode: str, threshold: float,
                 k: int, saliency: str = "l2", scale: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError("GatedConv2d needs a 4-d conv weight")
        out_c, in_c = weight.shape[:2]
        self.weight = nn.Parameter(weight.detach().clone())
        b = bias.detach().clone() if bias is not None else weight.new_zeros(out_c)
        self.bias = nn.Parameter(b)
        if scale is None:
            scale = weight.new_ones(in_c)
        self.register_buffer("scale", scale.detach().to(weight.device, torch.float32).clone())
        self.stride = tuple(int(v) for v in stride)
        self.padding = tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)
        self.mode = mode
        self.threshold = float(threshold)
        self.k = int(k)
        self.saliency = saliency
        self.in_channels, self.out_channels = int(in_c), int(out_c)
        #: unpadded and undilated: on an input the kernel covers, the layer is a matrix product
        self._linear_ok = self.padding == (0, 0) and self.dilation == (1, 1)
        self.register_buffer("weight_t", None, persistent=False)
        #: which of the layer's original input channels it reads (passes/prune_dead.py removes
        #: the ones no input keeps); None: all of them, in order
        self.register_buffer("in_index", None, persistent=False)
        #: fused epilogue (passes/fuse_epilogues.py): forward takes a residual to add, and/or
        #: applies an activation (a key of ACTIVATIONS) to the result
        self.residual_add = False
        self.act: str | None = None
        self.strategy = "gather"
        self.orient = _native.ORIENT_PIX
        #: output positions per instance the layer mostly sees (the ``nhwc`` kernel's register
        #: tile is chosen for it; None: unknown)
        self.out_hw: int | None = None
        #: the ``nhwc`` kernel of a 3x3 stride-1 layer by Winograd (True) or direct (False), as
        #: select_kernels timed them; None: ``native.winograd_chosen``'s rule
        self.winograd: bool | None = None
        self._native = None
        self._nhwc = None

    def set_strategy(self, strategy: str, orient: int | None = None, *,
                     out_hw: int | None = None, winograd: bool | None = None) -> None:
        """Choose the eager CPU kernel (see :mod:`ispc.ops.cpu_kernels`); prepares its weights
        (packed here, once: never per call).

        ``orient`` picks the native kernel's orientation (:mod:`ispc.ops.native`; default: pixels);
        ``out_hw`` (output positions per instance) the ``nhwc`` kernel's register tile;
        ``winograd`` forces the ``nhwc`` kernel's algorithm on a layer that fits Winograd
        (None: the rule; ignored where it does not fit).
        """
        if strategy not in _cpu.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; one of {_cpu.STRATEGIES}")
        if strategy in _cpu.NATIVE_STRATEGIES and not _native.available():
            raise ValueError(f"strategy {strategy!r} is not available here: "
                             f"{_native.unavailable_reason()}")
        self.strategy = strategy
        self.orient = _native.ORIENT_PIX if orient is None else int(orient)
        if out_hw is not None:
            self.out_hw = int(out_hw)
        self.winograd = None if winograd is None else bool(winograd)
        self._prepare()

    def _prepare(self) -> None:
        self.weight_t = _cpu.prepare_weight(self.weight) if self.strategy == "gemm" else None
        self._native = (_native.NativeLayer(self.weight, self.bias, self.stride, self.padding,
                                            self.dilation, self.orient)
                        if self.strategy == "native" else None)
        # a top-k layer's kept channels: its reduction (weighed in the register tile's choice by
        # builds with NH_SHORT_REDUCTION)
        kept = self.k if self.mode == "topk" and 0 < self.k < self.in_channels else None
        fits = _native.winograd_fits(tuple(self.weight.shape[-2:]), self.stride, self.dilation)
        self._nhwc = (_native.NhwcConv(self.weight.detach(), self.bias.detach(), self.stride,
                                       self.padding, self.dilation, out_hw=self.out_hw,
                                       reduction=kept, winograd=self.winograd if fits else None)
                      if self.strategy == "nhwc" and self.weight.dtype == torch.float32 else None)

    def sliced(self, *, out_keep: Tensor | None = None, in_keep: Tensor | None = None) -> "GatedConv2d":
        """A copy with only the ``out_keep`` output and ``in_keep`` input channels (indices into
        this layer's), the same gate (k at most the channels left) and kernel choice."""
        w, b, scale, index = _sliced_tensors(self, out_keep, in_keep)
        new = GatedConv2d(w, b, stride=self.stride, padding=self.padding, dilation=self.dilation,
                          mode=self.mode, threshold=self.threshold, k=min(self.k, int(w.shape[1])),
                          saliency=self.saliency, scale=scale)
        new.in_index = index
        new.residual_add, new.act = self.residual_add, self.act
        new.ispc_full_channels = full_channels(self)
        new.set_strategy(self.strategy, self.orient, out_hw=self.out_hw, winograd=self.winograd)
        return new

    @property
    def prepared(self):
        """The current strategy's prepared weights (``W^T``, a ``NativeLayer``, an ``NhwcConv``,
        or None)."""
        if self.strategy == "nhwc":
            return self._nhwc
        return self._native if self.strategy == "native" else self.weight_t

    def _load_from_state_dict(self, *args, **kwargs):  # keep prepared weights in sync
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    @property
    def _args(self) -> tuple:
        return (self.stride[0], self.stride[1], self.padding[0], self.padding[1], self.dilation[0],
                self.dilation[1], MODE_CODES[self.mode], self.threshold, self.k,
                SALIENCY_CODES[self.saliency])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The gated convolution of ``x``; with a fused epilogue, ``act(conv + residual)``."""
        mode = MODE_CODES[self.mode]
        if _gc.kept_all(mode, self.threshold, self.k, self.in_channels):
            # every channel kept: the operator is the dense convolution, in every context (eager,
            # autograd, export, compile, ONNX). Tested first, before any other check: on
            # MobileNetV2 at keep_ratio=1.0 the eager-path checks alone cost ~2% of the model's time
            nh = self._nhwc
            if (nh is not None and _cpu.nhwc_serves(x) and x.shape[1] == nh.cin
                    and self._direct(x)
                    and (residual is None or self._c_reads_nhwc(residual, nh, x))):
                # the channels-last kernel's dense mode: weights packed once, epilogue fused
                link = self.sums_out
                if link is None:
                    return nh.run(x, _native.DENSE, None, 0.0, 0, 0, residual, ACTIVATIONS[self.act])
                sums = link.new(x.shape[0], nh.cout)
                out = nh.run(x, _native.DENSE, None, 0.0, 0, 0, residual, ACTIVATIONS[self.act],
                             None, sums, link.kind)
                link.put(out, sums)
                return out
            if self._linear_ok and x.shape[-2:] == self.weight.shape[-2:]:
                out = _as_linear(x, self.weight, self.bias)  # oneDNN's conv is ~10x slower here
            else:
                out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            if not (self.act or residual is not None):
                return out
            if self._direct(x):
                # oneDNN's output, in place: MobileNetV2 at keep_ratio=1.0 in 0.964x the time of
                # PyTorch's new tensors for the add and ReLU6 (batch 1, 2-core Xeon)
                return self._epilogue_in_place(out, residual)
            return self._epilogue(out, residual)
        if x.dim() != 4:  # each instance picks its own channels: a batch axis is needed
            raise DataError(f"a gated convolution got a {x.dim()}-D input of shape "
                            f"{tuple(x.shape)}; pass a batch, N x C x H x W (one image: "
                            f"x.unsqueeze(0))")
        layer, scale = self._native, self.scale
        nh = self._nhwc
        if (nh is not None and scale.dtype == torch.float32 and _cpu.nhwc_serves(x)
                and self._direct(x) and scale.is_contiguous() and x.shape[1] == nh.cin):
            # the channels-last kernel: x read in place, bias/residual/activation fused, output
            # channels-last for the layers after it (its checks are the ones made here)
            sal = SALIENCY_CODES[self.saliency]
            if residual is None or self._c_reads_nhwc(residual, nh, x):
                src, link = self.sums_in, self.sums_out
                if src is None and link is None:
                    return nh.run(x, mode, scale, self.threshold, self.k, sal, residual,
                                  ACTIVATIONS[self.act])
                sums = None if link is None else link.new(x.shape[0], nh.cout)
                out = nh.run(x, mode, scale, self.threshold, self.k, sal, residual,
                             ACTIVATIONS[self.act], None if src is None else src.get(x, sal), sums,
                             0 if link is None else link.kind)
                if link is not None:
                    link.put(out, sums)
                return out
            out = nh.run(x, mode, scale, self.threshold, self.k, sal, None, _native.NO_CLAMP)
            return self._epilogue_in_place(out, residual)
        if (layer is not None and x.dtype == torch.float32 and scale.dtype == torch.float32
                and self._direct(x) and (layer.orient != _native.ORIENT_FULL
                                         or x.shape[-2:] == self.weight.shape[-2:])):
            # the native kernel straight from here: half of the Python a call took through
            # run_strategy (~28 -> ~23 us per call, paid by every gated layer at batch 1)
            xc = x if x.is_contiguous() else x.contiguous()
            sal = SALIENCY_CODES[self.saliency]
            if not (self.act or residual is not None):
                return layer.gated(xc, scale, mode, self.threshold, self.k, sal)
            shape = layer.out_shape(x.shape[0], x.shape[-2], x.shape[-1])
            if self._epilogue_fits(shape) and (residual is None or self._c_reads(residual, shape)):
                return layer.gated(xc, scale, mode, self.threshold, self.k, sal, residual,
                                   ACTIVATIONS[self.act])
            out = layer.gated(xc, scale, mode, self.threshold, self.k, sal)
            return self._epilogue_in_place(out, residual)
        elif self._direct(x):  # plain eager CPU inference: skip the dispatcher round trip
            a = self._args
            # native: the input size changed; nhwc: an NCHW input (or not float32)
            strategy = self.strategy if self.strategy not in _cpu.NATIVE_STRATEGIES else "gather"
            out = _cpu.run_strategy(strategy, x, self.weight, self.prepared, self.bias,
                                    self.scale, self.stride, self.padding, self.dilation, a[6], a[7],
                                    a[8], a[9])
            if self.act or residual is not None:
                return self._epilogue_in_place(out, residual)
        elif _triton.serves(x, self.weight, residual):  # eager CUDA: the Triton kernels, epilogue fused
            return _triton.gated_conv2d_cuda(x, self.weight, self.bias, self.scale, self.stride,
                                             self.padding, self.dilation, mode, self.threshold,
                                             self.k, SALIENCY_CODES[self.saliency],
                                             residual=residual, act=self.act)
        else:
            out = torch.ops.ispc.gated_conv2d(x, self.weight, self.bias, self.scale, *self._args)
        return self._epilogue(out, residual) if self.act or residual is not None else out

    @staticmethod
    def _epilogue_fits(shape: tuple[int, ...]) -> bool:
        """Whether the fused epilogue pays for an output of ``shape``: outputs up to
        :data:`EPILOGUE_MAX_BYTES` (at batch 1 it gains 3%; at batch 32 ResNet-50 with every
        epilogue in the kernel took 898 ms, with larger outputs' in the pass after it 813 ms, with
        none in the kernel 826 ms: 2-core Xeon, one process)."""
        n, c, h, w = shape
        return n * c * h * w * 4 <= EPILOGUE_MAX_BYTES

    @staticmethod
    def _c_reads(residual: Tensor, out: Tensor | tuple[int, ...]) -> bool:
        """Whether the native library (the kernel, or :func:`ispc.ops.native.epilogue`) can add
        ``residual`` itself: a plain float32 tensor laid out as the output (``out``; a shape: a
        contiguous one) that needs no gradient (C cannot backpropagate)."""
        if type(residual) is not Tensor or residual.dtype != torch.float32 or (
                residual.requires_grad and torch.is_grad_enabled()):
            return False
        if isinstance(out, Tensor):
            return residual.shape == out.shape and residual.stride() == out.stride()
        return residual.is_contiguous() and residual.shape == out

    @staticmethod
    def _c_reads_nhwc(residual: Tensor, layer: _native.NhwcConv, x: Tensor) -> bool:
        """Whether the channels-last kernel adds ``residual`` itself: a plain channels-last float32
        tensor of the output's shape that needs no gradient."""
        if type(residual) is not Tensor or residual.dtype != torch.float32 or (
                residual.requires_grad and torch.is_grad_enabled()):
            return False
        n, _, h, w = x.shape
        return (tuple(residual.shape) == (n, layer.cout, *layer.out_size(h, w))
                and residual.is_contiguous(memory_format=torch.channels_last))

    def _epilogue(self, out: Tensor, residual: Tensor | None) -> Tensor:
        """The fused epilogue as PyTorch ops, new tensors (the paths the native library does not
        serve: autograd, export, other dtypes, no compiler)."""
        if residual is not None:
            out = out + residual
        return apply_activation(out, self.act)

    def _epilogue_in_place(self, out: Tensor, residual: Tensor | None) -> Tensor:
        """:meth:`_epilogue` written into ``out``, the output a CPU kernel just returned (the
        native kernel's, where its output is too large for it to apply the epilogue itself, at
        batch 32; the other kernels' and oneDNN's): one pass over memory in C
        (:func:`ispc.ops.native.epilogue`) instead of PyTorch's new tensors for ``out + residual``
        and the activation (on a 98 MB ResNet-50 output 19.9 ms out of place, 12.3 ms as ``add_``
        and ``relu_``). Only a tensor of its own is written: a view could be the layer's bias (an
        instance that keeps no channel) or a linear layer's output. What the C pass cannot take
        (a GELU, a view, no native library, another dtype, a residual that broadcasts or needs
        gradients) goes through :meth:`_epilogue`."""
        if (self.act != "gelu" and out._base is None
                and (out.is_contiguous() or _native.is_channels_last(out))
                and out.dtype == torch.float32 and _native.available()
                and (residual is None or self._c_reads(residual, out))):
            return _native.epilogue(out, residual, ACTIVATIONS[self.act])
        return self._epilogue(out, residual)

    def _direct(self, x: Tensor) -> bool:
        """True when calling the CPU kernel directly is indistinguishable from calling the op:
        a plain CPU tensor (no fake/functional tensor, proxy or compiler tracing) and no autograd."""
        return plain_cpu_call(x) and not (torch.is_grad_enabled()
                                          and (x.requires_grad or self.weight.requires_grad))

    @property
    def keeps_all(self) -> bool:
        """Whether this layer keeps every channel of every input (it is the dense convolution)."""
        return _gc.kept_all(MODE_CODES[self.mode], self.threshold, self.k, self.in_channels)

    def kept_mask(self, x: Tensor) -> Tensor:
        """Which input channels each instance of ``x`` keeps (bool, N x C)."""
        a = self._args
        return _gc.channel_mask(x, self.scale, a[6], a[7], a[8], a[9])

    def reference(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The masked-dense form this layer must equal (its epilogue included)."""
        out = _gc.gated_conv2d_reference(x, self.weight, self.bias, self.scale, *self._args)
        return self._epilogue(out, residual)

    def extra_repr(self) -> str:
        gate = f"threshold={self.threshold:.4g}" if self.mode == "threshold" else f"k={self.k}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, mode={self.mode}, {gate}, "
                f"saliency={self.saliency}, strategy={self.strategy}"
                + (", + residual" if self.residual_add else "")
                + (f", act={self.act}" if self.act else "")
                + (f", orient={self.orient}" if self.strategy == "native" else "")
                + (f", out_hw={self.out_hw}" if self.strategy == "nhwc" and self.out_hw else ""))


class GatedLinear(GatedConv2d):
    """A linear layer over the last dimension of an ``N x ... x C`` input (an ``N x H x W x C`` map,
    ``N x T x C`` tokens) that skips, per instance, the input channels with negligible saliency
    over the positions or tokens: the 1x1 gated convolution of the input seen as a channels-last
    ``N x C x P x 1`` map (:func:`ispc.ops.linear_kernels.as_map`), so it is that convolution in
    every pass, the archive, ONNX and TensorRT (one ``torch.ops.ispc.gated_conv2d`` call between
    two views). It computes ``linear(x * m[n, None, ..., :])`` (:meth:`reference`); its weight is
    held as ``O x C x 1 x 1``. Eager CPU calls run :mod:`ispc.ops.linear_kernels` (``strategy``:
    ``gemm``, ``native`` or ``nhwc``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, *, mode: str, threshold: float, k: int,
                 saliency: str = "l2", scale: Tensor | None = None) -> None:
        w = weight.detach().reshape(weight.shape[0], -1, 1, 1)
        super().__init__(w, bias, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mode=mode,
                         threshold=threshold, k=k, saliency=saliency, scale=scale)
        self.strategy = "gemm"
        #: rows (positions or tokens per instance) the layer was compiled for: the nhwc kernel
        #: picks its register tile by them
        self.positions: int | None = None

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def set_strategy(self, strategy: str, orient: int | None = None, *,
                     winograd: bool | None = None) -> None:
        """Choose the eager CPU kernel (:data:`ispc.ops.linear_kernels.STRATEGIES`; a convolution's
        ``gather``/``grouped`` run as ``gemm``); prepares its weights. ``winograd``: as
        :meth:`GatedConv2d.set_strategy` takes it, and moot here (no 3x3 taps)."""
        if strategy in ("gather", "grouped"):
            strategy = "gemm"
        if strategy not in _lk.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} for a gated linear layer; one of "
                             f"{_lk.STRATEGIES}")
        if strategy == "native" and not _native.available():
            raise ValueError(f"strategy 'native' is not available here: {_native.unavailable_reason()}")
        if strategy == "nhwc" and not _lk.nhwc_available():
            raise ValueError("strategy 'nhwc' is not available in this build of ispc.ops.native")
        self.strategy = strategy
        self.orient = _native.ORIENT_PIX if orient is None else int(orient)
        self._prepare()

    def _prepare(self) -> None:
        self.weight_t = None
        self._native = None
        if self.strategy == "gemm":
            self.weight_t = _lk.prepare("gemm", self.weight, self.bias)
        elif self.strategy in ("native", "nhwc"):
            self._native = _lk.prepare(self.strategy, self.weight, self.bias, self.orient,
                                       self.positions)

    @property
    def prepared(self):
        return self.weight_t if self.strategy == "gemm" else self._native

    def dense(self) -> nn.Linear:
        """The plain linear layer this one computes when every channel is kept."""
        lin = nn.Linear(self.in_channels, self.out_channels, device="meta")
        lin.weight = nn.Parameter(self.weight.detach().reshape(self.out_channels, -1),
                                  requires_grad=False)
        lin.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        lin.ispc_full_channels = full_channels(self)
        return lin

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The gated linear layer of ``x``; with a fused epilogue, ``act(linear + residual)``."""
        mode = MODE_CODES[self.mode]
        if _gc.kept_all(mode, self.threshold, self.k, self.in_channels):
            out = F.linear(x, self.weight.reshape(self.out_channels, -1), self.bias)
        elif self._direct(x) and x.dtype == self.weight.dtype:
            out, fused = _lk.run(self.strategy, x, self.weight, self.prepared, self.bias,
                                 self.scale, mode, self.threshold, self.k,
                                 SALIENCY_CODES[self.saliency], residual,
                                 ACTIVATIONS[self.act] if self.act else None)
            if fused or not (self.act or residual is not None):
                return out
            return self._epilogue_in_place(out, residual)
        else:
            xm = _lk.as_map(x)
            if _triton.serves(xm, self.weight, None):  # eager CUDA: channels-last in and out
                y = _triton.gated_conv2d_cuda(xm, self.weight, self.bias, self.scale, self.stride,
                                              self.padding, self.dilation, mode, self.threshold,
                                              self.k, SALIENCY_CODES[self.saliency])
            else:
                y = torch.ops.ispc.gated_conv2d(xm, self.weight, self.bias, self.scale, *self._args)
            out = _lk.from_map(y, x.shape)
        return self._epilogue(out, residual) if self.act or residual is not None else out

    def kept_mask(self, x: Tensor) -> Tensor:
        """Which input channels each instance of ``x`` (N x ... x C) keeps (bool, N x C)."""
        return super().kept_mask(_lk.as_map(x))

    def reference(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The masked-dense form this layer must equal: ``linear(x * m[n, None, ..., :])``."""
        out = _lk.gated_linear_reference(x, self.weight, self.bias, self.kept_mask(x))
        return self._epilogue(out, residual)

    def sliced(self, *, out_keep: Tensor | None = None, in_keep: Tensor | None = None) -> "GatedLinear":
        """A copy with only the ``out_keep`` output and ``in_keep`` input channels (indices into
        this layer's), the same gate and kernel."""
        w, b, scale, index = _sliced_tensors(self, out_keep, in_keep)
        new = GatedLinear(w, b, mode=self.mode, threshold=self.threshold,
                          k=min(self.k, int(w.shape[1])), saliency=self.saliency, scale=scale)
        new.in_index = index
        new.residual_add, new.act = self.residual_add, self.act
        new.positions = self.positions
        new.ispc_full_channels = full_channels(self)
        new.set_strategy(self.strategy, self.orient)
        return new

    def extra_repr(self) -> str:
        gate = f"threshold={self.threshold:.4g}" if self.mode == "threshold" else f"k={self.k}"
        return (f"in_features={self.in_channels}, out_features={self.out_channels}, mode={self.mode}, "
                f"{gate}, saliency={self.saliency}, strategy={self.strategy}"
                + (", + residual" if self.residual_add else "")
                + (f", act={self.act}" if self.act else ""))


def gate_input(module: nn.Module, x: Tensor) -> Tensor:
    """What a gated layer's saliency is computed on: ``x`` itself for a convolution, the
    channels-last map view of an ``N x ... x C`` input for a linear layer over its last dimension
    (:class:`GatedLinear`, or the ``nn.Linear`` it replaces)."""
    if isinstance(module, (GatedLinear, nn.Linear)):
        return _lk.as_map(x)
    return x


def _sliced_tensors(mod: nn.Module, out_keep: Tensor | None, in_keep: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A gated layer's weight, bias, saliency scale and input-channel index restricted to the
    ``out_keep`` output and ``in_keep`` input channels (what ``sliced`` builds its copy from)."""
    w, b, scale = mod.weight.detach(), mod.bias.detach(), mod.scale
    index = mod.in_index if mod.in_index is not None else torch.arange(mod.in_channels)
    if out_keep is not None:
        w, b = w[out_keep], b[out_keep]
    if in_keep is not None:
        w, scale, index = w[:, in_keep], scale[in_keep], index[in_keep.to(index.device)]
    return w, b, scale, index


def full_channels(m: nn.Module) -> tuple[int, int]:
    """(output, input) channels of a convolution before ``passes/prune_dead.py`` removed dead
    ones from it: what its dense MACs count."""
    full = getattr(m, "ispc_full_channels", None)
    if full is not None:
        return full
    if isinstance(m, nn.Linear):
        return int(m.out_features), int(m.in_features)
    return int(m.out_channels), int(m.in_channels)


def _as_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A convolution whose unpadded kernel covers its input, as the matrix product it is."""
    y = F.linear(x.flatten(1), weight.flatten(1), bias)
    return y[:, :, None, None]


class LinearConv2d(nn.Conv2d):
    """An ``nn.Linear`` that reads a flattened ``C x H x W`` feature map (or a vector: ``H = W = 1``),
    held as the equivalent ``H x W`` convolution so that ispc gates its ``C`` input channels like
    any convolution's (``GatingConfig(gate_linear=True)``, ``passes/linear_as_conv.py``). It runs
    as the linear layer it was (a conv with this kernel is ~10x slower in oneDNN) and returns
    ``N x out x 1 x 1``; the pass flattens that again for the layers after it.
    """

    def __init__(self, linear: nn.Linear, channels: int, kernel: tuple[int, int]) -> None:
        kh, kw = int(kernel[0]), int(kernel[1])
        if channels * kh * kw != linear.in_features:
            raise ValueError(f"{channels} x {kh} x {kw} inputs do not make the linear layer's "
                             f"{linear.in_features} features")
        super().__init__(channels, linear.out_features, (kh, kw), bias=linear.bias is not None,
                         device="meta")
        # views of the linear layer's tensors: no copy of what can be hundreds of MB
        self.weight = nn.Parameter(linear.weight.detach().view(linear.out_features, channels, kh, kw),
                                   requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return _as_linear(x, self.weight, self.bias)


def dense_conv(mod: GatedConv2d, input_hw: tuple[int, int] | None = None) -> nn.Conv2d:
    """The plain layer a gated layer computes when every channel is kept: an ``nn.Linear`` for a
    :class:`GatedLinear`, a :class:`LinearConv2d` when its kernel covers an ``input_hw`` input,
    else an ``nn.Conv2d``."""
    if isinstance(mod, GatedLinear):
        return mod.dense()
    kh, kw = (int(v) for v in mod.weight.shape[-2:])
    if mod._linear_ok and input_hw is not None and tuple(input_hw) == (kh, kw):
        lin = nn.Linear(mod.in_channels * kh * kw, mod.out_channels, device="meta")
        lin.weight = nn.Parameter(mod.weight.detach().flatten(1))
        lin.bias = nn.Parameter(mod.bias.detach())
        out = LinearConv2d(lin, mod.in_channels, (kh, kw))
        if hasattr(mod, "ispc_full_channels"):
            out.ispc_full_channels = mod.ispc_full_channels
        return out
    conv = nn.Conv2d(mod.in_channels, mod.out_channels, (kh, kw), mod.stride, mod.padding,
                     mod.dilation, bias=True).to(mod.weight.device, mod.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(mod.weight)
        conv.bias.copy_(mod.bias)
    if hasattr(mod, "ispc_full_channels"):
        conv.ispc_full_channels = mod.ispc_full_channels
    return conv


class NhwcDenseConv2d(Watched, nn.Conv2d):
    """An ungated convolution (a stem, a downsample, a depthwise 3x3, a layer selection left dense)
    on ispc's channels-last kernels: :class:`~ispc.ops.native.NhwcConv` in its dense mode, or
    :class:`~ispc.ops.native.DepthwiseConv3x3`, weights packed once (here, and again when a state
    dict is loaded), bias, residual and activation fused (``act``/``residual_add``, set by
    ``fuse_epilogues`` as for :class:`GatedConv2d`). oneDNN called from eager PyTorch reorders its
    weights on every call; this does not. Channels-last float32 CPU inputs only: any other call
    (NCHW, autograd, export, CUDA) is the plain convolution and the same epilogue in PyTorch.
    ``passes/dense_kernels.py`` puts it where it measured faster than oneDNN."""

    act: str | None = None
    residual_add = False
    #: the saliency sums of its output, for the gated layers that read it (``passes/hand_sums.py``)
    sums_out: SaliencySums | None = None

    def __init__(self, conv: nn.Conv2d, out_hw: int | None = None) -> None:
        if not self.fits(conv):
            raise ValueError(f"NhwcDenseConv2d cannot run {conv}: it takes float32 convolutions "
                             "with zero padding, groups=1 or a depthwise 3x3 with the same stride "
                             "and padding along both axes")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, bias=True, device="meta")
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=conv.weight.requires_grad)
        self.bias = nn.Parameter(conv.bias.detach() if conv.bias is not None
                                 else conv.weight.new_zeros(conv.out_channels))
        if hasattr(conv, "ispc_full_channels"):
            self.ispc_full_channels = conv.ispc_full_channels
        self.out_hw = out_hw
        self._prepare()

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        """Whether ``conv`` is a convolution these kernels compute."""
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(
                conv.padding, str) or conv.weight.dtype != torch.float32 or conv.weight.is_cuda:
            return False
        if conv.groups == 1:
            return _native.supports(conv.stride)
        return (conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (3, 3)
                and conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1]
                and conv.padding[0] == conv.padding[1])

    def _prepare(self) -> None:
        w, b = self.weight.detach(), self.bias.detach()
        if self.groups > 1:
            self._kernel = _native.DepthwiseConv3x3(w, b, self.stride[0], self.padding[0])
        else:
            self._kernel = _native.NhwcConv(w, b, self.stride, self.padding, self.dilation,
                                            out_hw=self.out_hw)

    @property
    def prepared(self) -> _native.NhwcConv | _native.DepthwiseConv3x3:
        """The native kernel with its packed weights (what the runner's programs and the
        latency-aware timing call), as :attr:`GatedConv2d.prepared` is for a gated layer."""
        return self._kernel

    def _load_from_state_dict(self, *args, **kwargs):  # keep the packed weights in sync
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if (plain_cpu_call(x) and _cpu.nhwc_serves(x) and x.shape[1] == self.in_channels
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            clamp, link = ACTIVATIONS[self.act], self.sums_out
            if self.groups > 1:
                if residual is None or GatedConv2d._c_reads_nhwc(residual, self, x):
                    if link is None:
                        return self._kernel.run(x, residual, clamp)
                    sums = link.new(x.shape[0], self.out_channels)
                    out = self._kernel.run(x, residual, clamp, sums, link.kind)
                    link.put(out, sums)
                    return out
            elif residual is None or GatedConv2d._c_reads_nhwc(residual, self._kernel, x):
                if link is None:
                    return self._kernel.run(x, _native.DENSE, None, 0.0, 0, 0, residual, clamp)
                sums = link.new(x.shape[0], self.out_channels)
                out = self._kernel.run(x, _native.DENSE, None, 0.0, 0, 0, residual, clamp, None,
                                       sums, link.kind)
                link.put(out, sums)
                return out
        out = super().forward(x)
        if residual is not None:
            out = out + residual
        return apply_activation(out, self.act)

    @property
    def cout(self) -> int:  # what GatedConv2d._c_reads_nhwc reads of a layer
        return self.out_channels

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def extra_repr(self) -> str:
        return (super().extra_repr() + ", nhwc" + (", + residual" if self.residual_add else "")
                + (f", act={self.act}" if self.act else ""))


class ChannelsLastMaxPool2d(Watched, nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools CPU maps channels-last.

    A channels-last float32 map (a compiled model's, ``GatingConfig.channels_last``) is pooled by
    ispc's native kernel in one pass (:func:`ispc.ops.native.maxpool_nhwc`; ResNet's 3x3/2 stem
    pool of 64x112x112 at batch 1 on 2 Xeon cores: 0.064 ms against 0.28 ms in PyTorch 2.13's
    channels-last kernel, 0.39 ms with the ReLU before it, which the native pass applies after the
    max instead: ``act``, set by ``fuse_epilogues``, exact). A contiguous NCHW map is pooled in
    channels-last layout by PyTorch (its NCHW CPU kernel is slow: the same pool took ~4 ms against
    ~1.4 ms including both layout copies, ``benchmarks/kernel_speed.py``) and returned as
    contiguous NCHW. The result is identical (a max selects, it does not round; NaN propagates).
    Elsewhere (CUDA, tracing, export, autograd, ``return_indices``, ``ceil_mode`` or dilation on
    the native path) it is the plain module.
    """

    #: the activation applied after the maxima (a class default: instances pickled before it
    #: existed load without it)
    act: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or x.dim() != 4 or not plain_cpu_call(x) or (
                torch.is_grad_enabled() and x.requires_grad):
            return self._act(super().forward(x))
        window = self.native_window(x.shape[-2], x.shape[-1])
        if (window is not None and x.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last) and _native.available()):
            return _native.maxpool_nhwc(x, *window, ACTIVATIONS[self.act])
        if x.is_contiguous() and x.shape[1] > 1:
            y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size,
                             self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)
            return self._act(y.contiguous())
        return self._act(super().forward(x))

    def native_window(self, h: int, w: int) -> tuple[tuple[int, int], ...] | None:
        """(kernel, stride, padding) of the native channels-last pool over h x w maps, or None
        where it does not take this pool (indices, ceil mode, dilation, padding over half the
        window, a map smaller than the window)."""
        (kh, kw), (ph, pw) = _pair(self.kernel_size), _pair(self.padding)
        if (self.return_indices or self.ceil_mode or _pair(self.dilation) != (1, 1) or 2 * ph > kh
                or 2 * pw > kw or h + 2 * ph < kh or w + 2 * pw < kw):
            return None
        return (kh, kw), _pair(self.stride if self.stride is not None else self.kernel_size), (ph, pw)

    def _act(self, out: Tensor) -> Tensor:
        return apply_activation(out, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act}" if self.act else "")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class StridedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` for non-overlapping windows (stride = kernel, no padding, no dilation) on
    CPU, computed as elementwise maxima of the ``kh*kw`` strided views of the input.

    Every input element is read once by a vectorized elementwise kernel, where PyTorch 2.13's
    pooling kernels walk windows: VGG-16's 2x2 pools run 1.8-5x faster than the NCHW kernel at
    batch 1 and 32 on 2 cores (``benchmarks/kernel_speed.py``), and need no layout copies. The result
    is identical (NaN propagates as in ``max_pool2d``) and keeps the input's memory format.
    Elsewhere (CUDA, tracing, export, autograd, ``ceil_mode`` with a partial window) it is the
    plain module.

    ``act`` (a key of :data:`ACTIVATIONS`; set by ``fuse_epilogues``) applies the activation of the
    layer before the pool after it: max commutes with ReLU/ReLU6, so the result is the same, and a
    2x2 pool of a contiguous NCHW float32 map then runs as one C pass with the activation in it
    (:func:`ispc.ops.native.maxpool2x2`; VGG-16's 64x224x224 map: 0.34 ms against 1.8-2.2 ms for
    the ReLU pass and the elementwise maxima).
    """

    #: the activation applied after the maxima (a class default: instances pickled before it
    #: existed load without it)
    act: str | None = None

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        if not self.non_overlapping(self):
            raise ValueError("StridedMaxPool2d needs stride == kernel_size, padding 0, dilation 1 "
                             "and no return_indices; use nn.MaxPool2d for other pools")

    @staticmethod
    def non_overlapping(pool: nn.MaxPool2d) -> bool:
        """Whether ``pool``'s windows tile its input without overlap or padding."""
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return (_pair(stride) == _pair(pool.kernel_size) and _pair(pool.padding) == (0, 0)
                and _pair(pool.dilation) == (1, 1) and not pool.return_indices)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = _pair(self.kernel_size)
        if not (x.dim() == 4 and plain_cpu_call(x) and not (torch.is_grad_enabled() and x.requires_grad)):
            return self._act(super().forward(x))
        if self.native_window(x.shape[-2], x.shape[-1]) is None:
            return self._act(super().forward(x))
        ho, wo = x.shape[-2] // kh, x.shape[-1] // kw
        if ((kh, kw) == (2, 2) and x.dtype == torch.float32
                and (x.is_contiguous() or _native.is_channels_last(x)) and _native.available()):
            out = _native.maxpool2x2(x, ACTIVATIONS[self.act])
            if out is not None:
                return out
        views = [x[:, :, i:ho * kh:kh, j:wo * kw:kw] for i in range(kh) for j in range(kw)]
        if len(views) == 1:
            return self._act(views[0].clone())
        out = torch.maximum(views[0], views[1])
        for v in views[2:]:
            torch.maximum(out, v, out=out)
        return self._act(out)

    def native_window(self, h: int, w: int) -> tuple[tuple[int, int], ...] | None:
        """(kernel, stride, padding) of the non-overlapping windows over h x w maps, or None where
        they do not tile it as the pool needs (a map smaller than the window, ``ceil_mode`` with a
        partial window): the module's own path."""
        kh, kw = _pair(self.kernel_size)
        if h < kh or w < kw or (self.ceil_mode and (h % kh or w % kw)):
            return None
        return (kh, kw), (kh, kw), (0, 0)

    def _act(self, out: Tensor) -> Tensor:
        return apply_activation(out, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act}" if self.act else "")


def fast_max_pool(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> nn.MaxPool2d:
    """The fastest eager-CPU equivalent of ``nn.MaxPool2d(...)`` (no ``return_indices``):
    :class:`StridedMaxPool2d` for non-overlapping windows, else :class:`ChannelsLastMaxPool2d`."""
    plain = nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
    cls = StridedMaxPool2d if StridedMaxPool2d.non_overlapping(plain) else ChannelsLastMaxPool2d
    return cls(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


class GlobalAvgPool2d(Watched, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` (the pool before a classifier) that averages a channels-last
    float32 CPU map in one native pass (:func:`ispc.ops.native.avgpool_global_nhwc`): inside a
    compiled model PyTorch's kernel took 0.085-0.115 ms on MobileNetV2's and ResNet-18's 7x7 maps
    at batch 1 (2-core Xeon, ``benchmarks/peers_profile.py``), its thread pool woken for a few
    thousand additions. Equal to within rounding (float sums in position order, as PyTorch's).
    Elsewhere (NCHW, CUDA, tracing, export, autograd) it is the plain module."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() == 4 and x.dtype == torch.float32 and plain_cpu_call(x)
                and not (torch.is_grad_enabled() and x.requires_grad)
                and x.is_contiguous(memory_format=torch.channels_last) and x.shape[-1] * x.shape[-2] > 0
                and _native.available()):
            return _native.avgpool_global_nhwc(x)
        return super().forward(x)


class ToMemoryFormat(Watched):
    """Where a compiled model runs channels-last (``GatingConfig.channels_last``): at its inputs,
    4-d maps become channels-last (NHWC); at its outputs, contiguous NCHW again, so callers see the
    layout they passed in. Only plain eager CPU calls convert: traced, exported, compiled and ONNX
    graphs see the identity (layout is not a value, and those backends choose their own).

    ``enabled`` switches the conversion off without changing the graph (the latency-aware check
    times the model both ways)."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not (self.enabled and isinstance(x, Tensor) and x.dim() == 4 and plain_cpu_call(x)):
            return x
        if self.channels_last:
            if (x.dtype == torch.float32 and x.shape[1] <= _native.TO_CHANNELS_LAST_MAX
                    and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
                    and not (torch.is_grad_enabled() and x.requires_grad) and _native.available()):
                # an image: one native pass (a 3x224x224 image in ~0.012 ms, PyTorch's copy ~0.04)
                return _native.to_channels_last(x)
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def extra_repr(self) -> str:
        return ("channels_last" if self.channels_last else "contiguous") + (
            "" if self.enabled else ", disabled")
