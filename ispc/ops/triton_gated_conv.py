"""The CUDA kernels of ``torch.ops.ispc.gated_conv2d``, written in Triton.

Two steps, three launches at most per gated layer, no host synchronisation (so a whole gated model
can be captured in a CUDA graph, :mod:`ispc.backends.cuda_graphs`):

1. **select** (:func:`select_channels`): each instance's channel saliencies and its kept channels,
   as an index tensor ``idx[N, C]`` (kept channels first, ascending) and a count ``cnt[N]``. One
   program per instance computes and selects in registers (:func:`select_fused_kernel`, one launch)
   where the batch fills the GPU; for small batches the saliency sums are spread over the whole GPU
   first (:func:`saliency_partial_kernel`) and selected after (two launches).
2. **convolve** (:func:`gated_conv2d_indexed`): an implicit GEMM on the tensor cores whose
   reduction visits only the kept channels (``tl.dot``; float32 maps in TF32 or IEEE precision as
   PyTorch's own convolutions would run, :func:`float32_precision`; bfloat16/float16 maps in their
   type), the weight packed once per input channel (:func:`pack_weight`), tiles tuned per layer
   shape (:func:`tuning_log`), and the layer's epilogue (bias, residual add, ReLU/ReLU6) fused.
   Maps may be NCHW or channels-last; the output keeps the input's layout.

Registration: :func:`register_cuda_kernel` (called when :mod:`ispc.ops` is imported) registers
:func:`gated_conv2d_triton` as the ``"cuda"`` kernel of the operator if the ``triton`` package is
installed; triton itself is imported only when a kernel first runs. ``ISPC_TRITON=0`` in the
environment (or :func:`set_enabled(False)`) routes CUDA tensors back to the generic PyTorch kernels.
``GatedConv2d`` calls :func:`gated_conv2d_cuda` directly on plain eager CUDA tensors
(:func:`serves`), which is how its fused epilogue reaches the kernel.

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before triton is first imported, the
kernels run on CPU tensors in Triton's interpreter (slow: keep shapes small; the tests use a
subprocess so the setting stays isolated). The interpreter computes TF32 dots in float32.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import gated_conv as _gc

__all__ = ["kernel", "available", "enabled", "set_enabled", "register_cuda_kernel", "serves",
           "interpreting", "float32_precision", "kept_indices", "select_channels", "pack_weight",
           "gated_conv2d_indexed", "gated_conv2d_cuda", "gated_conv2d_triton", "Config",
           "CONFIGS_F32", "CONFIGS_16", "INTERPRET_CONFIG", "candidate_configs",
           "default_config", "tuning_log", "ACT_CODES"]

_state = {"enabled": os.environ.get("ISPC_TRITON", "1") != "0", "registered": False}

#: activations the fused epilogue applies (GatedConv2d.act) -> the kernel's code
ACT_CODES = {None: 0, "relu": 1, "relu6": 2}


@dataclass(frozen=True)
class Config:
    """One tiling of the convolution kernel: output pixels x output channels x kept channels per
    step, warps per program, software-pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}"
                f"/w{self.num_warps}/s{self.num_stages}")


#: tilings tried per layer shape for float32 maps (TF32/IEEE dot: 8 k-elements per MMA step)
CONFIGS_F32 = (Config(128, 128, 32, 8, 3), Config(128, 64, 32, 4, 4), Config(64, 128, 32, 4, 4),
               Config(64, 64, 32, 4, 4), Config(32, 64, 32, 4, 4))
#: ... and for bfloat16/float16 maps (16 k-elements per MMA step: longer k tiles)
CONFIGS_16 = (Config(128, 128, 64, 8, 3), Config(128, 64, 64, 4, 3), Config(64, 128, 64, 4, 3),
              Config(64, 64, 64, 4, 3), Config(32, 64, 64, 4, 3))
#: the interpreter's tiling (tl.dot needs 16; few programs keep it quick, and the tests' shapes
#: still span several tiles of each kind)
INTERPRET_CONFIG = Config(32, 16, 16, 1, 1)
#: at most this many tilings are timed per layer shape (the largest ones that fit it)
MAX_TUNED = 4
#: do_bench's warm-up and measurement per tiling, in ms (a ResNet-50 has ~16 gated shapes)
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20

#: the one-launch selection (a program per instance) serves batches of at least this many
#: instances, or maps of at most FUSED_MAX_ELEMS elements per instance; others spread the
#: saliency sums over the GPU first (two launches)
FUSED_MIN_N = 16
FUSED_MAX_ELEMS = 1 << 15
#: elements of a map one program of the selection kernels loads per step
SELECT_TILE = 4096
#: widest channel count the Triton selection takes (one program sorts its keys in registers)
SELECT_MAX_C = 8192

_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_TUNED: dict[tuple, Config] = {}
_TUNE_LOG: dict[tuple, dict[str, float]] = {}


def available() -> bool:
    """Whether the triton package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def enabled() -> bool:
    return bool(_state["enabled"])


def set_enabled(flag: bool) -> None:
    """Use (True) or bypass (False) the Triton kernels for CUDA tensors."""
    _state["enabled"] = bool(flag)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def serves(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> bool:
    """Whether :func:`gated_conv2d_cuda` may run ``x`` (and add ``residual``) directly, in place
    of the operator: plain eager CUDA tensors (no fake tensor, compiler or tracer), no autograd,
    the kernels on."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
        residual is not None and residual.requires_grad))
    return (type(x) is Tensor and x.is_cuda and _state["enabled"] and _state["registered"]
            and x.dim() == 4 and x.dtype in _DOT_TYPES and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not grad
            and (residual is None or type(residual) is Tensor))


_DOT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def float32_precision() -> str:
    """The precision float32 convolutions run in, as PyTorch's own would: "tf32" (tensor cores;
    the default for convolutions) or "ieee". Read from ``torch.backends.cudnn.conv.fp32_precision``
    (PyTorch >= 2.9; "none" defers to the cuDNN and global settings), else from
    ``torch.backends.cudnn.allow_tf32``, the flag cuDNN's dense convolutions follow: the gated
    and the dense layers of a model then compute alike."""
    cudnn = torch.backends.cudnn
    for owner in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        p = getattr(owner, "fp32_precision", None) if owner is not None else None
        if p in ("tf32", "ieee"):
            return p
    try:
        return "tf32" if cudnn.allow_tf32 else "ieee"
    except RuntimeError:  # mixed legacy/new flags: PyTorch refuses to say; the exact one
        return "ieee"


def _tk():
    from . import _triton_kernels

    return _triton_kernels


def kernel(name: str):
    """The Triton kernel called ``name`` (ahead-of-time compilers such as TensorRT's plugins
    compile it themselves); needs triton."""
    return getattr(_tk(), name)


def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _layout(x: Tensor) -> tuple[Tensor, int]:
    """``x`` contiguous in the layout the kernels read (0: NCHW, 1: channels-last), kept if it
    already is one of them."""
    if x.is_contiguous():
        return x, 0
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, 1
    return x.contiguous(), 0


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_device(x: Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise RuntimeError("the Triton gated conv runs on CUDA tensors (or on CPU with "
                           "TRITON_INTERPRET=1)")


# --- selection ------------------------------------------------------------------------------------

def kept_indices(x: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
                 saliency: int = _gc.SALIENCY_L2) -> tuple[Tensor, Tensor]:
    """``(idx[N, K] int32, cnt[N] int32)`` in PyTorch ops: each instance's kept channels first,
    ascending (topk: ``K = k``; threshold: ``K = C``, entries past ``cnt[n]`` unused). The
    reference :func:`select_channels` is tested against, and its fallback for channel counts over
    :data:`SELECT_MAX_C`."""
    n, c = x.shape[0], x.shape[1]
    if _gc._kept_all(mode, threshold, k, c):
        idx = torch.arange(c, device=x.device, dtype=torch.int32).expand(n, c).contiguous()
        return idx, torch.full((n,), c, device=x.device, dtype=torch.int32)
    s = _gc.channel_saliency(x, scale, saliency)
    if mode == _gc.TOPK:
        kk = max(0, min(int(k), c))
        if kk == 0:
            return (torch.zeros((n, 1), device=x.device, dtype=torch.int32),
                    torch.zeros((n,), device=x.device, dtype=torch.int32))
        idx = torch.topk(s, kk, dim=1, sorted=False).indices.sort(dim=1).values
        return idx.to(torch.int32).contiguous(), torch.full((n,), kk, device=x.device,
                                                            dtype=torch.int32)
    if mode != _gc.THRESHOLD:
        raise ValueError(f"unknown gating mode {mode}")
    kept = s >= threshold
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), kept.sum(dim=1).to(torch.int32)


def _norm(saliency: int, hw: int) -> float:
    if saliency == _gc.SALIENCY_L2:
        return 1.0 / max(hw, 1) ** 0.5
    if saliency == _gc.SALIENCY_L1:
        return 1.0 / max(hw, 1)
    raise ValueError(f"unknown saliency code {saliency}")


def _sm_count(x: Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 4


def select_channels(x: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
                    saliency: int = _gc.SALIENCY_L2, *,
                    fused: bool | None = None) -> tuple[Tensor, Tensor]:
    """Each instance's kept channels in Triton kernels: ``(idx[N, C] int32, cnt[N] int32)``, the
    kept channels first and ascending (entries past ``cnt[n]`` are undefined). ``x``: contiguous
    NCHW or channels-last. ``fused``: one launch (a program per instance) or two (the sums spread
    over the GPU, then the selection); None chooses by batch and map size."""
    _check_device(x)
    if mode not in (_gc.TOPK, _gc.THRESHOLD):
        raise ValueError(f"unknown gating mode {mode}")
    x, layout = _layout(x)
    n, c, h, w = x.shape
    if c > SELECT_MAX_C:
        return kept_indices(x, scale, mode, threshold, k, saliency)
    hw = h * w
    tk = _tk()
    idx = torch.empty((n, c), device=x.device, dtype=torch.int32)
    cnt = torch.empty((n,), device=x.device, dtype=torch.int32)
    if n == 0:
        return idx, cnt
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    cp = _np2(c)
    kk = int(max(0, min(int(k), c))) if mode == _gc.TOPK else 0
    norm = _norm(saliency, hw)
    if fused is None:
        fused = n >= FUSED_MIN_N or c * hw <= FUSED_MAX_ELEMS
    interp = interpreting()
    with _device_ctx(x):
        if fused:
            block_hw = max(1, min(_np2(hw), SELECT_TILE // cp))
            tk.select_fused_kernel[(n,)](
                x, scale, c, hw, c, kk, float(threshold), norm, idx, cnt, MODE=mode,
                SALIENCY=saliency, LAYOUT=layout, CP=cp, BLOCK_HW=block_hw,
                **({} if interp else {"num_warps": 8 if cp >= 1024 else 4}))
            return idx, cnt
        if layout == 0:
            block_c, block_hw = min(cp, 16), min(_np2(hw), 256)
        else:
            block_c, block_hw = min(cp, 64), min(_np2(hw), 64)
        nc = tk.cdiv(c, block_c)
        steps = tk.cdiv(hw, block_hw)
        want = max(1, (2 * _sm_count(x)) // max(n * nc, 1))
        per = tk.cdiv(steps, min(steps, want)) * block_hw  # positions per program
        nhb = tk.cdiv(hw, per)
        part = torch.empty((n, nhb, c), device=x.device, dtype=torch.float32)
        tk.saliency_partial_kernel[(n, nc, nhb)](x, c, hw, per, part, SALIENCY=saliency,
                                                 LAYOUT=layout, BLOCK_C=block_c,
                                                 BLOCK_HW=block_hw)
        tk.select_partials_kernel[(n,)](
            part, scale, c, nhb, c, kk, float(threshold), norm, idx, cnt, MODE=mode,
            SALIENCY=saliency, CP=cp, **({} if interp else {"num_warps": 8 if cp >= 1024 else 4}))
    return idx, cnt


# --- convolution ----------------------------------------------------------------------------------

def pack_weight(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The weight as the kernel reads it: ``(Cin * kh * kw, Cout)``, one contiguous row of output
    channels per input channel and tap (a kept channel's weights are whole rows). Cached per
    weight tensor (and its version), so a model's layers pack once."""
    dtype = dtype or weight.dtype
    hit = _PACKED.get(weight)
    version = weight._version
    if hit is not None and hit[0] == version and hit[1].dtype == dtype and (
            hit[1].device == weight.device):
        return hit[1]
    cout, cin, kh, kw = weight.shape
    packed = weight.detach().to(dtype).permute(1, 2, 3, 0).reshape(cin * kh * kw, cout).contiguous()
    if not torch.compiler.is_compiling():
        _PACKED[weight] = (version, packed)
    return packed


def candidate_configs(dtype: torch.dtype, m: int, cout: int) -> tuple[Config, ...]:
    """The tilings worth timing for a layer with ``m`` output pixels per instance and ``cout``
    output channels: no tile more than twice the next power of two above the layer's extent, the
    :data:`MAX_TUNED` largest of them."""
    table = CONFIGS_F32 if dtype == torch.float32 else CONFIGS_16
    fit = [cfg for cfg in table if cfg.block_m <= max(32, _np2(m)) and cfg.block_n <= max(32, _np2(cout))]
    return tuple((fit or [table[-1]])[:MAX_TUNED])


def default_config(dtype: torch.dtype, m: int, cout: int) -> Config:
    """The tiling used without tuning (and while a CUDA graph is being captured): the largest
    candidate."""
    return candidate_configs(dtype, m, cout)[0]


def tuning_log() -> dict[str, dict[str, float]]:
    """Each tuned layer shape -> the median ms of every tiling timed for it (the benchmark
    records it)."""
    return {str(key): dict(times) for key, times in _TUNE_LOG.items()}


def _tuning_enabled() -> bool:
    return os.environ.get("ISPC_TRITON_TUNE", "1") != "0"


def _pick_config(key: tuple, launch, dtype: torch.dtype, m: int, cout: int) -> Config:
    """The tuned tiling of this layer shape: the first call times each candidate with
    ``triton.testing.do_bench`` (medians) and keeps the fastest; during CUDA-graph capture (no
    timing possible) and with ``ISPC_TRITON_TUNE=0``, :func:`default_config`."""
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    cands = candidate_configs(dtype, m, cout)
    if (not _tuning_enabled() or len(cands) == 1 or torch.cuda.is_current_stream_capturing()):
        return cands[0]
    from triton.testing import do_bench

    times: dict[str, float] = {}
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        try:
            ms = float(do_bench(lambda cfg=cfg: launch(cfg), warmup=TUNE_WARMUP_MS,
                                rep=TUNE_REP_MS, return_mode="median"))
        except Exception:  # noqa: BLE001 - e.g. out of shared memory: not a candidate
            times[cfg.label()] = float("nan")
            continue
        times[cfg.label()] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    _TUNE_LOG[key] = times
    return best


def gated_conv2d_indexed(x: Tensor, weight: Tensor, bias: Tensor, idx: Tensor, cnt: Tensor,
                         stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                         dilation: tuple[int, int] = (1, 1), *, residual: Tensor | None = None,
                         act: str | None = None, precision: str | None = None,
                         config: Config | None = None, packed: Tensor | None = None) -> Tensor:
    """Launch the convolution kernel: for each instance ``n``, with ``j = idx[n, :cnt[n]]``,
    ``out[n] = act(conv2d(x[n, j], weight[:, j]) + bias + residual[n])``. The output has ``x``'s
    layout (NCHW or channels-last). ``precision``: float32's dot precision (default
    :func:`float32_precision`). Works on CUDA tensors, or on CPU tensors when
    ``TRITON_INTERPRET=1``."""
    _check_device(x)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("gated_conv2d_indexed needs a 4-d input and weight")
    if x.dtype not in _DOT_TYPES:
        raise ValueError(f"the Triton gated conv takes float32, float16 or bfloat16 maps, "
                         f"got {x.dtype}")
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; one of {list(ACT_CODES)}")
    x, layout = _layout(x)
    n, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != c:
        raise ValueError(f"weight has {cin} input channels, input has {c} (groups=1 only)")
    ho = _gc.conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _gc.conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if layout == 1 else torch.contiguous_format
    out = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=fmt)
    if out.numel() == 0:
        return out
    idx = idx.to(device=x.device, dtype=torch.int32)
    cnt = cnt.to(device=x.device, dtype=torch.int32).contiguous()
    if idx.dim() != 2 or idx.shape[0] != n or cnt.shape != (n,):
        raise ValueError(f"idx must be [N, K] and cnt [N] with N={n}, got {tuple(idx.shape)}, "
                         f"{tuple(cnt.shape)}")
    if idx.shape[1] == 0:  # nothing kept anywhere: the counts are 0, the pointer is never read
        idx = torch.zeros((n, 1), device=x.device, dtype=torch.int32)
    idx = idx.contiguous()
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, the output "
                             f"{tuple(out.shape)}")
        residual = residual.to(x.dtype).contiguous(memory_format=fmt)
    wp = packed if packed is not None else pack_weight(weight, x.dtype)
    b = bias.to(device=x.device, dtype=x.dtype).contiguous()
    interp = interpreting()
    if x.dtype == torch.float32:
        prec = precision or float32_precision()
    else:
        prec = "none"
    upcast = interp and x.dtype == torch.bfloat16
    tk = _tk()
    args = (x, wp, b, idx, cnt, residual, c, h, w, cout, ho, wo, idx.shape[1], stride[0],
            stride[1], padding[0], padding[1], dilation[0], dilation[1], out)
    consts = dict(KH=kh, KW=kw, LAYOUT=layout, HAS_RES=residual is not None, ACT=ACT_CODES[act],
                  PRECISION=prec, UPCAST=upcast)

    def launch(cfg: Config) -> None:
        grid = (tk.cdiv(ho * wo, cfg.block_m), tk.cdiv(cout, cfg.block_n), n)
        extra = {} if interp else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        tk.gated_conv_kernel[grid](*args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                   BLOCK_K=cfg.block_k, **extra)

    with _device_ctx(x):
        if config is None:
            if interp:
                config = INTERPRET_CONFIG
            else:
                # the epilogue is left out of the key: it costs little beside the main loop, and
                # every tiling timed is a kernel to compile (a ResNet-50 has four epilogues)
                key = (n, c, h, w, cout, kh, kw, tuple(stride), tuple(padding), tuple(dilation),
                       int(idx.shape[1]), str(x.dtype), layout, prec)
                config = _pick_config(key, launch, x.dtype, ho * wo, cout)
        launch(config)
    return out


def gated_conv2d_cuda(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor,
                      stride: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int], mode: int, threshold: float, k: int,
                      saliency: int = _gc.SALIENCY_L2, *, residual: Tensor | None = None,
                      act: str | None = None, fused_select: bool | None = None,
                      precision: str | None = None) -> Tensor:
    """The gated convolution with its epilogue, ``act(gated_conv2d(x) + residual)``, in the
    Triton kernels (or cuDNN where every channel is kept). The output has ``x``'s layout."""
    if _gc._kept_all(mode, threshold, k, x.shape[1]):
        out = F.conv2d(x, weight, bias, stride, padding, dilation)
        if residual is not None:
            out = out + residual
        return F.relu6(out) if act == "relu6" else torch.relu(out) if act == "relu" else out
    x, _ = _layout(x)
    idx, cnt = select_channels(x, scale, mode, threshold, k, saliency, fused=fused_select)
    kh, kw = weight.shape[-2:]
    shape = (x.shape[0], weight.shape[0],
             _gc.conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0]),
             _gc.conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1]))
    if residual is not None and (tuple(residual.shape) != shape or residual.dtype != x.dtype):
        # a residual that broadcasts or promotes: PyTorch's add after the kernel
        out = gated_conv2d_indexed(x, weight, bias, idx, cnt, stride, padding, dilation,
                                   precision=precision) + residual
        return F.relu6(out) if act == "relu6" else torch.relu(out) if act == "relu" else out
    return gated_conv2d_indexed(x, weight, bias, idx, cnt, stride, padding, dilation,
                                residual=residual, act=act, precision=precision)


def gated_conv2d_triton(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, stride_h: int,
                        stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int, mode: int,
                        threshold: float, k: int, saliency: int = _gc.SALIENCY_L2) -> Tensor:
    """The operator's semantics (see :mod:`ispc.ops.gated_conv`) with the Triton kernels. The
    output is contiguous NCHW, as the operator's fake implementation says (compiled graphs plan
    their memory by it); :func:`gated_conv2d_cuda` keeps a channels-last input's layout."""
    return gated_conv2d_cuda(x, weight, bias, scale, (stride_h, stride_w), (pad_h, pad_w),
                             (dil_h, dil_w), mode, threshold, k, saliency).contiguous()


def _cuda_kernel(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode,
                 threshold, k, saliency):
    fast = _state["enabled"] and x.dtype in _DOT_TYPES
    impl = gated_conv2d_triton if fast else _gc.gated_conv2d_fast
    return impl(x, weight, bias, scale, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, mode,
                threshold, k, saliency)


def register_cuda_kernel() -> bool:
    """Register the Triton kernels for CUDA tensors if triton is installed. Idempotent.

    Returns whether they are registered. Never imports triton.
    """
    if _state["registered"]:
        return True
    if not available():
        return False
    _gc.gated_conv2d.register_kernel("cuda")(_cuda_kernel)
    _state["registered"] = True
    return True
