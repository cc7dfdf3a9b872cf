"""The native CPU kernel: an indirect GEMM that reads kept channels and their weights by index.

``native_gated_conv.c`` is compiled on first use with the system C compiler (``cc``/``gcc``,
``-O3 -march=native -fopenmp``; about a second) into a cache folder (``$ISPC_CACHE_DIR/native`` or
``~/.cache/ispc/native``), keyed by the source, the compiler and this CPU's features so that a cache
shared between machines never hands one a binary for another. It is called through ``ctypes`` and
parallelised with OpenMP: PyTorch's own libgomp is already loaded, so both share one thread pool.

``ISPC_NATIVE_FLAGS`` adds compiler flags, e.g. ``-mno-avx512f`` for the AVX2 build on an AVX-512
CPU (``benchmarks/layers.py --isa avx2``). Where no compiler is present, or ``ISPC_NATIVE=0`` is
set, :func:`available` is False (with the reason in :func:`unavailable_reason`) and ispc uses its
PyTorch kernels instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import functools
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

__all__ = ["ORIENT_PIX", "ORIENT_CO", "ORIENT_FULL", "ORIENT_CL", "available", "full_window", "unavailable_reason",
           "pack_weight", "is_channels_last", "select", "gather", "epilogue", "maxpool2x2",
           "NativeLayer", "orientation_for", "supports", "NO_CLAMP", "RELU", "RELU6", "GELU",
           "DENSE", "NhwcConv", "pack_weight_nhwc", "DepthwiseConv3x3", "maxpool_nhwc",
           "avgpool_global_nhwc", "to_channels_last", "OpProgram", "pointwise", "expand_dw_fits",
           "cache_bytes", "avx512_half_width", "winograd_chosen", "winograd_fits", "cpuinfo",
           "cpuinfo_field", "cpu_flags", "vector_floats", "narrow_fmas", "move_to_huge_pages"]

ORIENT_PIX = 0  #: vector lanes over output pixels (large feature maps)
ORIENT_CO = 1   #: vector lanes over output channels (small feature maps)
#: one output position: the kernel covers the whole unpadded input (a Linear seen as a convolution);
#: lanes over output channels, each kept channel's weights read once per call (see the C file)
ORIENT_FULL = 2
#: lanes over output channels, as ORIENT_CO, with every tap read in place from one zero-padded
#: channels-last copy of the kept channels (ORIENT_CO's panels are the kernel's taps times as large)
ORIENT_CL = 3

#: output maps with at most this many positions use ORIENT_CO by default (1x1 kernels; several taps
#: take ORIENT_CL, see ``select_kernels.predicted_strategy``)
SMALL_MAP = 16 * 16

#: the kernel splits strided inputs into stride_h * stride_w phases, at most this many
MAX_PHASES = 64

_SOURCE = Path(__file__).with_name("native_gated_conv.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-shared",
          "-fPIC", "-std=c11"]
_lock = threading.Lock()
_local = threading.local()  # one reusable workspace per thread: fresh buffers cost page faults
_lib: ctypes.CDLL | None = None
_error: str | None = None

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


#: epilogue clamps of NativeLayer.gated: none, ReLU, ReLU6
NO_CLAMP = (-math.inf, math.inf)
RELU = (0.0, math.inf)
RELU6 = (0.0, 6.0)
#: the exact (erf) GELU instead of a clamp: NhwcConv's epilogue only (``ispc_conv_nhwc``); the
#: other kernels read a NaN range as no clamp
GELU = (math.nan, math.nan)


class _Layer(ctypes.Structure):
    """``ispc_layer_t``: a gated layer's fixed arguments, passed by pointer."""

    _fields_ = [("wpack", _ptr), ("bias", _ptr)] + [(f, _i64) for f in (
        "cout", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "orient")]


class _NhwcLayer(ctypes.Structure):
    """``ispc_nhwc_layer_t``: a channels-last layer's fixed arguments, passed by pointer."""

    _fields_ = [("wpack", _ptr), ("bias", _ptr)] + [(f, _i64) for f in (
        "C", "cout", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "nv")] + [("wino", _ptr)]


class _Sums(ctypes.Structure):
    """``ispc_sums_t``: saliency sums handed between channels-last layers."""

    _fields_ = [("inp", _ptr), ("out", _ptr), ("out_kind", _i64),
                ("hand_out", _ptr), ("hand_in", _ptr), ("hand_cs", _i64)]  # hand-offs: C's own


def _sums(x_sums: Tensor | None, out_sums: Tensor | None, kind: int):
    """A pointer to an ``ispc_sums_t`` for the C entries (None: neither)."""
    if x_sums is None and out_sums is None:
        return None
    if kind not in (0, 1):
        raise ConfigError(f"unknown saliency code {kind} for out_sums (0: l2, 1: l1)")
    return ctypes.byref(_Sums(None if x_sums is None else x_sums.data_ptr(),
                              None if out_sums is None else out_sums.data_ptr(), kind))


def _check_sums(t: Tensor | None, name: str, shape: tuple[int, int]) -> None:
    if t is not None and not (t.dtype == torch.float32 and t.device.type == "cpu"
                              and t.is_contiguous() and tuple(t.shape) == shape):
        raise DataError(f"{name} must be a contiguous float32 CPU tensor of shape {shape}, got "
                        f"{t.dtype} {tuple(t.shape)}")


def _cache_dir() -> Path:
    root = os.environ.get("ISPC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ispc")
    return Path(root) / "native"


@functools.cache
def cpuinfo() -> str:
    """``/proc/cpuinfo``'s text, read once per process ("" where there is none): the build's
    cache key, :func:`avx512_half_width` and the benchmarks' machine records all read it here."""
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return ""


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line whose key is one of ``names`` (None: none)."""
    for line in cpuinfo().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where unknown."""
    return frozenset((cpuinfo_field("flags", "Features") or "").split())


def _cpu_features() -> str:
    for line in cpuinfo().splitlines(keepends=True):
        if line.startswith(("flags", "Features")):
            return line
    return platform.processor()


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (once per source, compiler, flags and CPU) and load the kernel library.

    ``extra_flags`` let tests build other variants, e.g. the AVX2 code path on an AVX-512 CPU.
    """
    flags = [*_FLAGS, *extra_flags]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, " ".join(flags),
                                    platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"ispc_native_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True,
                                 text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
            os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    lib.ispc_cache_bytes.restype = _i64
    lib.ispc_cache_bytes.argtypes = [ctypes.c_int]
    lib.ispc_block_rows.restype = lib.ispc_block_lanes.restype = ctypes.c_int
    lib.ispc_block_rows.argtypes = lib.ispc_block_lanes.argtypes = [ctypes.c_int]
    lib.ispc_workspace.restype = _i64
    lib.ispc_workspace.argtypes = [_i64] * 12 + [ctypes.c_int, _i64, _i64, _i64]
    lib.ispc_packed_size.restype = _i64
    lib.ispc_packed_size.argtypes = [_i64, _i64, _i64, ctypes.c_int]
    lib.ispc_pack_weight.restype = None
    lib.ispc_pack_weight.argtypes = [_ptr, _i64, _i64, _i64, ctypes.c_int, _ptr]
    lib.ispc_gated_conv.restype = _i64
    lib.ispc_gated_conv.argtypes = [ctypes.POINTER(_Layer), _ptr, _i64, _i64, _i64, _i64, _ptr, _i64,
                                    _ptr, _ptr, _ptr, _i64, _i64]
    lib.ispc_gated_conv_select.restype = _i64
    lib.ispc_gated_conv_select.argtypes = [ctypes.POINTER(_Layer), _ptr, _i64, _i64, _i64, _i64, _ptr,
                                           _i64, _i64, ctypes.c_float, _i64, _ptr, _ptr, _ptr,
                                           ctypes.c_float, ctypes.c_float, _ptr, _i64, _i64]
    lib.ispc_select.restype = None
    lib.ispc_gather.restype = _i64
    lib.ispc_select.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, ctypes.c_float, _i64, _ptr,
                                _ptr, _ptr, _i64]
    lib.ispc_gather.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64]
    lib.ispc_epilogue.restype = None
    lib.ispc_epilogue.argtypes = [_ptr, _ptr, _i64, ctypes.c_float, ctypes.c_float, _i64]
    lib.ispc_maxpool2x2.restype = _i64
    lib.ispc_maxpool2x2.argtypes = [_ptr, _i64, _i64, _i64, ctypes.c_float, ctypes.c_float, _ptr, _i64]
    lib.ispc_select_nhwc.restype = lib.ispc_gather_nhwc.restype = lib.ispc_maxpool2x2_nhwc.restype = _i64
    lib.ispc_select_nhwc.argtypes = lib.ispc_select.argtypes
    lib.ispc_gather_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64]
    lib.ispc_maxpool2x2_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _i64, ctypes.c_float, ctypes.c_float,
                                         _ptr, _i64]
    lib.ispc_nhwc_vectors.restype = lib.ispc_nhwc_packed_size.restype = _i64
    lib.ispc_nhwc_max_vectors.restype = _i64
    lib.ispc_nhwc_max_vectors.argtypes = []
    lib.ispc_vector_floats.restype = _i64
    lib.ispc_vector_floats.argtypes = []
    lib.ispc_nhwc_vectors.argtypes = [_i64, _i64]
    lib.ispc_nhwc_vectors_for.restype = _i64
    lib.ispc_nhwc_vectors_for.argtypes = [_i64, _i64, _i64]
    lib.ispc_nhwc_packed_size.argtypes = [_i64, _i64, _i64, _i64]
    lib.ispc_pack_weight_nhwc.restype = None
    lib.ispc_pack_weight_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr]
    lib.ispc_conv_nhwc.restype = _i64
    lib.ispc_conv_nhwc.argtypes = [ctypes.POINTER(_NhwcLayer), _ptr, _i64, _i64, _i64, _ptr, _i64, _i64,
                                   ctypes.c_float, _i64, _ptr, _ptr, _ptr, ctypes.c_float,
                                   ctypes.c_float, ctypes.POINTER(_Sums), _ptr, _i64, _i64]
    lib.ispc_dwconv3x3_nhwc.restype = _i64
    lib.ispc_dwconv3x3_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr,
                                        ctypes.c_float, ctypes.c_float, ctypes.POINTER(_Sums), _ptr,
                                        _i64, _i64]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("ISPC_NATIVE", "1") == "0":
                _error = "disabled by ISPC_NATIVE=0"
            else:
                try:
                    _lib = _build(tuple(os.environ.get("ISPC_NATIVE_FLAGS", "").split()))
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _error = f"native kernel unavailable: {exc}"
    return _lib


def available() -> bool:
    """Whether the native kernel could be built and loaded on this machine."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _error


def cache_bytes() -> dict[str, int]:
    """The L1 data cache's and L2's sizes per core (bytes) that the kernels block for, as read
    from the system at load (``NH_L2_BYTES`` in ``ISPC_NATIVE_FLAGS`` fixes L2): benchmarks record
    them beside the CPU model, since blocking differs between a 1 MiB and a 2 MiB L2."""
    lib = _loaded()
    return {"l1d": int(lib.ispc_cache_bytes(1)), "l2": int(lib.ispc_cache_bytes(2))}


def supports(stride: tuple[int, int]) -> bool:
    """Whether the kernel takes a layer with this stride (the only geometric limit it has)."""
    return stride[0] * stride[1] <= MAX_PHASES


def full_window(kernel: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                input_hw: tuple[int, int]) -> bool:
    """Whether a convolution's kernel covers its whole ``input_hw`` input with no padding or
    dilation, so that it has one output position: the geometry :data:`ORIENT_FULL` computes."""
    return (tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)
            and tuple(int(v) for v in input_hw) == tuple(int(v) for v in kernel))


def orientation_for(out_hw: int) -> int:
    """The orientation expected to be faster for a 1x1 layer's output map of ``out_hw`` positions
    (and for a layer with few input channels on a larger map)."""
    return ORIENT_CO if out_hw <= SMALL_MAP else ORIENT_PIX


def pack_weight(weight: Tensor, orient: int) -> Tensor:
    """Weights (Cout, C, kh, kw) as the kernel's panels: each input channel's slice contiguous."""
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    w = weight.detach().to("cpu", torch.float32).contiguous()  # a CUDA model keeps a CPU copy
    cout, c, kh, kw = w.shape
    dst = torch.empty(lib.ispc_packed_size(cout, c, kh * kw, orient), dtype=torch.float32)
    lib.ispc_pack_weight(w.data_ptr(), cout, c, kh * kw, orient, dst.data_ptr())
    return dst


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-d map stored channels-last (NHWC) rather than contiguous NCHW: the
    layout a channels-last model's maps arrive in (``ispc.GatingConfig(channels_last=...)``)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def select(x: Tensor, scale: Tensor, mode: int, threshold: float, k: int,
           saliency: int) -> tuple[Tensor, Tensor]:
    """Saliency and selection of a gated layer (the operator's semantics, as in
    :meth:`NativeLayer.gated`) without its convolution: ``(idx, counts)``, ``idx`` int64 (N, C) with
    each instance's kept channels first, ascending, then zeros; ``counts`` int64 (N,). ``x``
    float32 (N, C, H, W), contiguous or channels-last; ``scale`` contiguous float32 (C,)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    nhwc = _check_map(x, "x")
    n, c = x.shape[0], x.shape[1]
    _check_f32(scale, "scale", ndim=1)
    if scale.numel() != c:
        raise ValueError(f"scale has {scale.numel()} entries, x has {c} channels")
    idx = torch.empty(n, c, dtype=torch.int64)
    counts = torch.empty(n, dtype=torch.int64)
    scratch = torch.empty(2 * n * c, dtype=torch.float32)
    args = (x.data_ptr(), n, c, x[0, 0].numel() if n and c else 0, scale.data_ptr(), saliency,
            mode, threshold, k, idx.data_ptr(), counts.data_ptr(), scratch.data_ptr(),
            torch.get_num_threads())
    if not nhwc:
        lib.ispc_select(*args)
    elif lib.ispc_select_nhwc(*args):
        raise MemoryError("ispc_select_nhwc: out of memory")
    return idx, counts


def epilogue(out: Tensor, residual: Tensor | None = None,
             clamp: tuple[float, float] = NO_CLAMP) -> Tensor:
    """``out = clamp(out + residual, *clamp)`` in place, in one multithreaded pass (PyTorch's
    ``add_`` then ``relu_`` make two): the fused epilogue of a gated layer whose kernel returned
    its output without it. ``out`` float32, contiguous or channels-last; ``residual`` (None: none)
    float32 of its shape and strides."""
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    _check_map(out, "out", ndim=None)
    if residual is not None:
        if residual.shape != out.shape or residual.stride() != out.stride():
            raise ValueError(f"the residual must have the output's shape {tuple(out.shape)} and "
                             f"strides {out.stride()}, got {tuple(residual.shape)} and "
                             f"{residual.stride()}")
        if residual.dtype != torch.float32 or residual.device.type != "cpu":
            raise ValueError(f"residual must be a float32 CPU tensor, got {residual.dtype}")
    lib.ispc_epilogue(out.data_ptr(), None if residual is None else residual.data_ptr(), out.numel(),
                      clamp[0], clamp[1], torch.get_num_threads())
    return out


def maxpool2x2(x: Tensor, clamp: tuple[float, float] = NO_CLAMP) -> Tensor | None:
    """``clamp(max_pool2d(x, 2), *clamp)`` for a float32 ``x`` (N, C, H, W), contiguous or
    channels-last (the result keeps its layout), in one pass (an activation's clamp commutes with
    the max: exact); None where this build has no such kernel (no AVX-512), for the caller's
    PyTorch path."""
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    nhwc = _check_map(x, "x")
    n, c, h, w = x.shape
    threads = torch.get_num_threads()
    if nhwc:
        out = torch.empty((n, c, h // 2, w // 2), dtype=torch.float32,
                          memory_format=torch.channels_last)
        failed = lib.ispc_maxpool2x2_nhwc(x.data_ptr(), n, h, w, c, clamp[0], clamp[1],
                                          out.data_ptr(), threads)
    else:
        out = torch.empty((n, c, h // 2, w // 2), dtype=torch.float32)
        failed = lib.ispc_maxpool2x2(x.data_ptr(), n * c, h, w, clamp[0], clamp[1], out.data_ptr(),
                                     threads)
    return None if failed else out


def gather(src: Tensor, idx: Tensor, width: int, counts: Tensor | None = None) -> Tensor:
    """``src[o, idx[o, :width]]`` for a contiguous float32 ``src`` (O, C, ...) and an int64 ``idx``
    of O rows, or of one row shared by all O (weights); rows from ``counts[o]`` on are zeros.
    A channels-last map (N, C, H, W) with one row of ``idx`` per instance gives a channels-last
    (N, width, H, W).
    The threads split the rows (``index_select`` over dimension 1 took 1.2 ms on VGG-16's
    64x224x224 input at batch 1, 2-core Xeon)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    if is_channels_last(src):
        return _gather_nhwc(lib, src, idx, width, counts)
    _check_f32(src, "src")
    if src.dim() < 2:
        raise ValueError(f"src must have rows and channels (O, C, ...), got shape {tuple(src.shape)}")
    o, c = src.shape[0], src.shape[1]
    rows = idx.unsqueeze(0) if idx.dim() == 1 else idx
    if (idx.dtype != torch.int64 or not idx.is_contiguous() or rows.dim() != 2
            or rows.shape[0] not in (1, o) or not 0 <= width <= rows.shape[1]):
        raise ValueError(f"idx must be a contiguous int64 row, or {o} rows, of at least width={width} "
                         f"entries; got {idx.dtype} {tuple(idx.shape)}")
    if counts is not None and (counts.dtype != torch.int64 or not counts.is_contiguous()
                               or counts.numel() != o):
        raise ValueError(f"counts must be a contiguous int64 tensor of {o} entries")
    inner = src[0, 0].numel() if o and c else 0
    out = torch.empty((o, width, *src.shape[2:]), dtype=torch.float32)
    shared = rows.shape[0] == 1
    if lib.ispc_gather(src.data_ptr(), o, c, inner, idx.data_ptr(), 0 if shared else idx.shape[-1],
                       0 if counts is None else counts.data_ptr(), width, out.data_ptr(),
                       torch.get_num_threads()):
        raise ValueError(f"idx holds channels outside [0, {c})")
    return out


def _gather_nhwc(lib: ctypes.CDLL, src: Tensor, idx: Tensor, width: int,
                 counts: Tensor | None) -> Tensor:
    """:func:`gather` of a channels-last map: each position's kept channels, one masked AVX-512
    gather per 16 (the position's row of C floats is in L1)."""
    _check_map(src, "src")
    n, c, h, w = src.shape
    if (idx.dtype != torch.int64 or not idx.is_contiguous() or idx.dim() != 2
            or idx.shape[0] != n or idx.shape[1] != c or not 0 <= width <= c):
        raise ValueError(f"idx must be a contiguous int64 ({n}, {c}) tensor (a row per instance) "
                         f"and 0 <= width={width} <= {c}; got {idx.dtype} {tuple(idx.shape)}")
    if counts is None:
        counts = torch.full((n,), width, dtype=torch.int64)
    elif counts.dtype != torch.int64 or not counts.is_contiguous() or counts.numel() != n:
        raise ValueError(f"counts must be a contiguous int64 tensor of {n} entries")
    out = torch.empty((n, width, h, w), dtype=torch.float32, memory_format=torch.channels_last)
    bad = lib.ispc_gather_nhwc(src.data_ptr(), n, h * w, c, idx.data_ptr(), counts.data_ptr(), width,
                               out.data_ptr(), torch.get_num_threads())
    if bad < 0:
        raise MemoryError("ispc_gather_nhwc: out of memory")
    if bad:
        raise ValueError(f"idx holds channels outside [0, {c})")
    return out


def _check_map(t: Tensor, name: str, ndim: int | None = 4) -> bool:
    """:func:`_check_f32` for a tensor the C entries also take channels-last (then any 4-d
    float32 CPU tensor in that layout passes). Returns whether it is channels-last."""
    if not is_channels_last(t):
        _check_f32(t, name, ndim=ndim)
        return False
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return True


def _check_f32(t: Tensor, name: str, ndim: int | None = None) -> None:
    """The C entries read raw float32 memory: refuse anything else rather than read past it."""
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" or (
            ndim is not None and t.dim() != ndim) or t.dim() < 1:
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor"
                         + (f" with {ndim} dimensions" if ndim else "")
                         + f", got {t.dtype} {tuple(t.shape)} on {t.device}"
                         + ("" if t.is_contiguous() else " (not contiguous)"))


def _workspace(floats: int) -> Tensor:
    """A per-thread scratch buffer of at least ``floats`` floats, grown on demand.

    It is an anonymous memory map, outside the C heap: allocating it per call made the 56x56 layers
    ~30% slower (fresh pages fault on first write), and a long-lived buffer on the heap changed how
    the allocator recycled the model's large activations, so that other layers' outputs paid page
    faults instead (VGG-16's first convolution ran 3-8x slower after gated layers).
    """
    ws = getattr(_local, "ws", None)
    if ws is None or ws.numel() < floats:
        size = max(floats, 1 << 16) * 4
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if _huge_pages_offered():  # as the plans' maps (see move_to_huge_pages)
            buf.madvise(mmap.MADV_HUGEPAGE)
        ws = _local.ws = torch.frombuffer(buf, dtype=torch.float32)
        _local.buf = buf  # the tensor borrows the mapping: keep it alive as long as the tensor
        _local.ws_args = (ws.data_ptr(), ws.numel())
    return ws


def workspace_args() -> tuple[int, int]:
    """This thread's workspace (:func:`_workspace`) as an entry's last arguments: pointer, floats."""
    args = getattr(_local, "ws_args", None)
    if args is None:
        _workspace(0)
        args = _local.ws_args
    return args


_HUGE_PAGE = 2 << 20


@functools.lru_cache(maxsize=1)
def _huge_pages_offered() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks (THP ``madvise`` or
    ``always``); ``ISPC_HUGE_PAGES=0`` turns :func:`move_to_huge_pages` off."""
    if os.environ.get("ISPC_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def move_to_huge_pages(layers: list[NhwcConv]) -> int:
    """Moves the layers' packed weights (and Winograd panels) that are not there yet into one
    memory map of 2 MiB pages (transparent huge pages on request), each layer's struct pointed at
    the copies in place; returns the bytes moved (0 where the kernel offers no huge pages).

    At batch 1 the weights are read from memory, a scattered half of each panel's rows per call,
    a 4 KiB page every 16 rows: on a VM every TLB miss is a nested page walk (ResNet-50 keep 0.5:
    1.3% of the call, 2-core Zen 4). One map for all: 2 MiB pages per layer would leave a part
    page per layer. The map lives as long as any tensor in it; the heap copies are freed and
    the heap trimmed."""
    todo = [(layer, name) for layer in layers for name in ("packed", "_wino")
            if getattr(layer, name, None) is not None and not getattr(layer, "_huge", False)]
    olds = [getattr(layer, name) for layer, name in todo]
    news = empty_on_huge_pages([old.numel() for old in olds])
    if news is None:
        return 0
    for (layer, name), old, new in zip(todo, olds, news):
        new.copy_(old.reshape(-1))
        setattr(layer, name, new.view(old.shape))
    for layer in {id(layer): layer for layer, _ in todo}.values():
        layer._huge = True
        layer._struct.wpack = layer.packed.data_ptr()  # in place: plans hold the struct's address
        layer._struct.wino = None if layer._wino is None else layer._wino.data_ptr()
    _trim_heap()
    return 4 * sum(_floats_on_huge_pages(old.numel()) for old in olds)


def _floats_on_huge_pages(n: int) -> int:
    """The floats a buffer of ``n`` takes in :func:`empty_on_huge_pages`' map: 64-byte runs."""
    return -(-max(n, 1) // 16) * 16


def empty_on_huge_pages(sizes: list[int]) -> list[Tensor] | None:
    """Float32 buffers of these sizes, 64-byte aligned, in one fresh memory map of 2 MiB pages
    (a program's maps: written and read every call); None where the kernel offers none."""
    if not sizes or not _huge_pages_offered():
        return None
    runs = [_floats_on_huge_pages(n) for n in sizes]
    try:
        buf = mmap.mmap(-1, 4 * sum(runs) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    at = -torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
    out = []
    for n, r in zip(sizes, runs):
        out.append(torch.frombuffer(buf, dtype=torch.float32, count=max(n, 1), offset=at))
        at += 4 * r
    return out


def _trim_heap() -> None:
    """The freed heap copies handed back to the system (glibc keeps freed blocks inside its heap:
    ResNet-50's ~110 MB stayed resident)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class NativeLayer:
    """One gated convolution prepared for the native kernel: packed weights, a bias copy and the
    fixed arguments in one C struct, so that a call converts only what changes per input.

    It holds copies: after changing the layer's weights in place, prepare it again
    (``GatedConv2d.set_strategy``; loading a state dict does this).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], orient: int) -> None:
        if _load() is None:
            raise RuntimeError(_error)
        if not supports(stride):
            raise ValueError(f"the native kernel takes strides with at most {MAX_PHASES} phases, "
                             f"not {tuple(stride)}")
        self.cout, _, kh, kw = (int(v) for v in weight.shape)
        self.orient = int(orient)
        if self.orient not in (ORIENT_PIX, ORIENT_CO, ORIENT_FULL, ORIENT_CL):
            raise ValueError(f"unknown orientation {orient!r}")
        if self.orient == ORIENT_FULL and (tuple(padding) != (0, 0) or tuple(dilation) != (1, 1)):
            raise ValueError("ORIENT_FULL takes only unpadded, undilated layers whose kernel covers "
                             f"the input, not padding {tuple(padding)}, dilation {tuple(dilation)}")
        self.packed = pack_weight(weight, self.orient)
        self.bias = (torch.zeros(self.cout) if bias is None
                     else bias.detach().to("cpu", torch.float32).contiguous().clone())
        self.kernel = (int(kh), int(kw))
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._bind()

    def _bind(self) -> None:
        """(Re)build the C struct: it points into this object's own tensors."""
        self._struct = _Layer(self.packed.data_ptr(), self.bias.data_ptr(), self.cout, *self.kernel,
                              *self.stride, *self.padding, *self.dilation, self.orient)
        self._ref = ctypes.byref(self._struct)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._shapes: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}

    def __getstate__(self) -> dict:  # copies and pickles carry tensors, never raw pointers
        skip = ("_struct", "_ref", "_sizes", "_shapes")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if _load() is None:
            raise RuntimeError(_error)
        self._bind()

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        hw = self._sizes.get((h, w))
        if hw is None:
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
            hw = self._sizes[(h, w)] = ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                                        (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        return hw

    def __call__(self, x: Tensor, idx: Tensor, counts: Tensor | None) -> Tensor:
        """``x`` contiguous float32 (N, C, H, W); ``idx`` contiguous int64 (N, K), each row's kept
        channels first (sorted in place by the kernel); ``counts`` int64 (N,), how many of each
        row are kept (None: all K)."""
        n, c, h, w = x.shape
        out = self._output(n, h, w)
        cptr = 0 if counts is None else counts.data_ptr()
        self._run(_lib.ispc_gated_conv, (self._ref, x.data_ptr(), n, c, h, w,
                                         idx.data_ptr(), idx.shape[1], cptr, out.data_ptr()))
        return out

    def gated(self, x: Tensor, scale: Tensor, mode: int, threshold: float, k: int, saliency: int,
              residual: Tensor | None = None, clamp: tuple[float, float] = NO_CLAMP) -> Tensor:
        """The whole gated layer in one C call: saliency, selection (the operator's semantics, see
        :func:`ispc.ops.gated_conv.channel_mask`) and the convolution. ``x`` contiguous float32
        (N, C, H, W); ``scale`` contiguous float32 (C,). It replaces the PyTorch ops that selected
        in Python per layer and call (norm, scale, top-k or compare, index rows).

        The epilogue is fused: ``clamp(conv + residual, *clamp)`` where ``residual`` (contiguous
        float32, the output's shape) is added if given and ``clamp`` is an activation's range
        (:data:`RELU`, :data:`RELU6`; default none), so a following add and ReLU cost no pass over
        memory of their own."""
        n, c, h, w = x.shape
        out = self._output(n, h, w)
        if residual is not None and (residual.shape != out.shape or residual.dtype != torch.float32
                                     or not residual.is_contiguous()):
            raise ValueError(f"the residual must be a contiguous float32 tensor of the output's shape "
                             f"{tuple(out.shape)}, got {residual.dtype} {tuple(residual.shape)}"
                             + ("" if residual.is_contiguous() else " (not contiguous)"))
        rptr = None if residual is None else residual.data_ptr()
        self._run(_lib.ispc_gated_conv_select, (self._ref, x.data_ptr(), n, c, h, w, scale.data_ptr(),
                                                saliency, mode, threshold, k, None, out.data_ptr(),
                                                rptr, clamp[0], clamp[1]))
        return out

    def out_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        """The output shape for ``n`` inputs of ``h x w``."""
        shape = self._shapes.get((n, h, w))
        if shape is None:  # per call this lookup is ~1 us cheaper than building the shape
            shape = self._shapes[(n, h, w)] = (n, self.cout, *self.out_size(h, w))
        return shape

    def _output(self, n: int, h: int, w: int) -> Tensor:
        if self.orient == ORIENT_FULL and (h, w) != self.kernel:
            raise ValueError(f"this layer was prepared for {self.kernel[0]}x{self.kernel[1]} inputs "
                             f"(ORIENT_FULL: the kernel covers the input), got {h}x{w}; prepare it "
                             "with another orientation for other sizes")
        return torch.empty(self.out_shape(n, h, w), dtype=torch.float32)

    @staticmethod
    def _run(fn, args: tuple) -> None:
        """Call a kernel entry with this thread's workspace (grown and called again if the kernel
        asks for more); named in torch.profiler tables while profiling (examples/speed.py)."""
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function("ispc::native_gated_conv"):
                NativeLayer._call(fn, args)
        else:
            NativeLayer._call(fn, args)

    @staticmethod
    def _call(fn, args: tuple) -> int:
        """``fn(*args, workspace, its floats, threads)`` with this thread's workspace, grown and
        called again where the entry asks for more (a positive return); the last call's code (0:
        done, negative: the entry's own refusal)."""
        threads = torch.get_num_threads()
        ws = getattr(_local, "ws", None)
        if ws is None:
            ws = _workspace(0)
        need = fn(*args, ws.data_ptr(), ws.numel(), threads)
        if need > 0:  # first call at this size: grow the workspace and run
            ws = _workspace(need)
            need = fn(*args, ws.data_ptr(), ws.numel(), threads)
        return need


#: :meth:`NhwcConv.__call__`'s mode for a dense convolution (no selection: every channel kept)
DENSE = -1


def _pair_arg(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(u) for u in v)
    if len(t) != 2:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def pack_weight_nhwc(weight: Tensor, vectors: int) -> Tensor:
    """Weights (Cout, C, kh, kw) as :class:`NhwcConv`'s panels, blocks of ``vectors`` vectors of
    output channels: ``[Cout block][tap][C][block]``, each input channel's weights for one tap one
    contiguous run (a kept channel is one run per tap)."""
    lib = _loaded()
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if w.dim() != 4:
        raise ConfigError(f"weight must be (Cout, C, kh, kw), got shape {tuple(w.shape)}")
    cout, c, kh, kw = w.shape
    dst = torch.empty(lib.ispc_nhwc_packed_size(cout, c, kh * kw, vectors), dtype=torch.float32)
    lib.ispc_pack_weight_nhwc(w.data_ptr(), cout, c, kh * kw, vectors, dst.data_ptr())
    return dst


# F(2x2, 3x3)'s weight transform G (4 x 3): U = G g G^T per output and input channel
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_fits(kernel: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> bool:
    """Whether ``ispc_conv_nhwc`` can run a layer by Winograd F(2x2, 3x3): 3x3, stride 1, no
    dilation (any padding)."""
    return tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)


# output positions from which a fitting layer runs by Winograd (28x28 and up)
WINO_MIN_POSITIONS = 784
# the largest U (bytes) a layer runs by Winograd with: 128 -> 128 channels
WINO_MAX_U_BYTES = 1 << 20
# the same two where the kernels' FMAs are 256 bits wide (an AVX2 build, or AVX-512 on 256-bit
# datapaths, AMD Zen 4): there the direct kernel's FMAs take twice the cycles, and Winograd wins
# down to 14x14 maps with U up to 256 -> 256 channels (split between the threads, each reading
# its half of U once per call)
WINO_HALF_WIDTH_MIN_POSITIONS = 196
WINO_HALF_WIDTH_MAX_U_BYTES = 4 << 20


@functools.cache
def avx512_half_width() -> bool:
    """Whether this CPU runs AVX-512 on 256-bit datapaths: AMD family 25 (Zen 4) with AVX-512.
    Zen 5 (family 26) executes 512-bit operations at full width and keeps the common limits."""
    family = cpuinfo_field("cpu family")
    return (cpuinfo_field("vendor_id") == "AuthenticAMD" and "avx512f" in cpu_flags()
            and family is not None and family.isdigit() and int(family) == 25)


def vector_floats() -> int:
    """Floats per vector register of the loaded build: 16 (AVX-512), 8 (AVX2, or the generic
    vectors elsewhere)."""
    return int(_loaded().ispc_vector_floats())


def narrow_fmas() -> bool:
    """Whether the loaded build's FMAs process 256 bits or fewer at a time: built without
    AVX-512 (an AVX2-only CPU, or ``-mno-avx512f``), or AVX-512 on 256-bit datapaths
    (:func:`avx512_half_width`). Decides the Winograd limits (:func:`winograd_chosen`)."""
    return avx512_half_width() or vector_floats() < 16


# the fewest input channels: with few, the transforms outweigh the GEMMs (VGG's 3 -> 64 stem
# layer in situ 1.54 -> 3.65 ms)
WINO_MIN_CHANNELS = 32


def winograd_chosen(cin: int, cout: int, out_hw: int | None) -> bool:
    """Whether a fitting layer runs by Winograd: on maps of 28x28 outputs and up with 32 input
    channels or more its 16 / 36 of the multiplications outweigh its transforms while its U
    (16 / 9 the weights' bytes), which each thread reads for every chunk of tiles, stays in L2;
    on smaller maps or with a larger U the direct kernel wins (docs/benchmarks.md), except where
    the FMAs are 256 bits wide (:func:`narrow_fmas`: 14x14 and up, U to 4 MiB)."""
    half = narrow_fmas()
    min_positions = WINO_HALF_WIDTH_MIN_POSITIONS if half else WINO_MIN_POSITIONS
    max_u = WINO_HALF_WIDTH_MAX_U_BYTES if half else WINO_MAX_U_BYTES
    return (out_hw is not None and out_hw >= min_positions and cin >= WINO_MIN_CHANNELS
            and 16 * cin * cout * 4 <= max_u)


def pack_weight_winograd(weight: Tensor, vectors: int) -> Tensor:
    """A 3x3 layer's Winograd weights U = G g G^T (computed in float64, rounded once), packed as
    :func:`pack_weight_nhwc` packs 16 taps: ``[Cout block][16][C][block]``."""
    g = torch.tensor(_WINO_G, dtype=torch.float64)
    u = (g @ weight.detach().to("cpu", torch.float64) @ g.T).to(torch.float32)  # (Cout, C, 4, 4)
    return pack_weight_nhwc(u, vectors)


def _loaded() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(_error)
    return lib


class NhwcConv:
    """A convolution prepared for the channels-last native kernel (``ispc_conv_nhwc``): packed
    weights, a bias copy and the fixed arguments in one C struct.

    Called on a channels-last float32 map (N, C, H, W) it returns the channels-last output, with
    the bias, an optional residual (channels-last, the output's shape) and a clamp
    (:data:`RELU`, :data:`RELU6`) fused. ``mode`` :data:`DENSE` runs the dense convolution;
    ``gated_conv.TOPK`` / ``gated_conv.THRESHOLD`` select each instance's channels first (the
    operator's semantics, :func:`ispc.ops.gated_conv.channel_mask`) and compute on those alone.
    ``out_hw``, the output positions it will mostly see, helps choose the register tile
    (``vectors``: output-channel vectors per tile, to force one) and whether a 3x3 stride-1
    layer runs by Winograd F(2x2, 3x3) (``winograd``: True or False to force it; True on a layer
    that does not fit is an error). ``reduction``, the input channels it will mostly keep (a
    gated layer's k), is weighed in that choice only by builds with ``-DNH_SHORT_REDUCTION=r``
    (off by default: with the accumulators in registers the usual tiles won on short reductions).
    It holds copies: prepare it again after changing the weights.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 out_hw: int | None = None, vectors: int | None = None,
                 winograd: bool | None = None, reduction: int | None = None) -> None:
        lib = _loaded()
        if weight.dim() != 4 or weight.dtype != torch.float32:
            raise ConfigError(f"weight must be a float32 (Cout, C, kh, kw) tensor, got {weight.dtype} "
                              f"{tuple(weight.shape)}")
        self.cout, self.cin, kh, kw = (int(v) for v in weight.shape)
        self.kernel = (kh, kw)
        self.stride, self.padding = _pair_arg(stride, "stride"), _pair_arg(padding, "padding")
        self.dilation = _pair_arg(dilation, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ConfigError(f"stride and dilation must be >= 1 and padding >= 0, got stride "
                              f"{self.stride}, padding {self.padding}, dilation {self.dilation}")
        if bias is not None and bias.numel() != self.cout:
            raise ConfigError(f"bias has {bias.numel()} entries for {self.cout} output channels")
        self.vectors = int(lib.ispc_nhwc_vectors_for(self.cout, int(out_hw or 0),
                                                     int(reduction or 0) * kh * kw))
        if vectors is not None:  # a given register tile (tests, A/B); 0: this build's widest
            top = int(lib.ispc_nhwc_max_vectors())
            if not 0 <= vectors <= top:
                raise ConfigError(f"vectors must be in [0, {top}] on this build, got {vectors}")
            self.vectors = vectors or top
        fits = winograd_fits(self.kernel, self.stride, self.dilation)
        if winograd and not fits:
            raise ConfigError(f"winograd=True needs a 3x3 stride-1 undilated layer, got kernel "
                              f"{self.kernel}, stride {self.stride}, dilation {self.dilation}; "
                              f"pass winograd=None or False")
        self.winograd = fits and (winograd_chosen(self.cin, self.cout, out_hw) if winograd is None
                                  else bool(winograd))
        self.packed = pack_weight_nhwc(weight, self.vectors)
        self.bias = (torch.zeros(self.cout) if bias is None
                     else bias.detach().to("cpu", torch.float32).contiguous().clone())
        self._bind()

    def _bind(self) -> None:
        # U is derived from the weights: rebuilt here (also after unpickling), never stored
        self._wino = (pack_weight_winograd(self.weight(), self.vectors)
                      if getattr(self, "winograd", False) else None)
        self._struct = _NhwcLayer(self.packed.data_ptr(), self.bias.data_ptr(), self.cin, self.cout,
                                  *self.kernel, *self.stride, *self.padding, *self.dilation,
                                  self.vectors, None if self._wino is None else self._wino.data_ptr())
        self._ref = ctypes.byref(self._struct)
        self._shapes: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}

    def weight(self) -> Tensor:
        """The (Cout, C, kh, kw) float32 weights, unpacked from the panels."""
        kh, kw = self.kernel
        t, nr = kh * kw, int(_loaded().ispc_nhwc_packed_size(1, 1, 1, self.vectors))
        w = self.packed.view(-1, t, self.cin, nr).permute(0, 3, 2, 1).reshape(-1, self.cin, t)
        return w[:self.cout].reshape(self.cout, self.cin, kh, kw).contiguous()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_struct", "_ref", "_shapes", "_wino", "_huge")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _loaded()
        self._bind()

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def __call__(self, x: Tensor, mode: int = DENSE, *, scale: Tensor | None = None,
                 threshold: float = 0.0, k: int = 0, saliency: int = 0,
                 residual: Tensor | None = None, clamp: tuple[float, float] = NO_CLAMP,
                 counts: Tensor | None = None, x_sums: Tensor | None = None,
                 out_sums: Tensor | None = None, out_sums_kind: int = 0) -> Tensor:
        """The layer on ``x``; ``counts`` (int64 (N,), optional) receives each instance's kept
        channel count (gated modes).

        Saliency sums (``[n, c]``: the sum over the map's positions of ``v * v`` for the l2
        saliency, ``|v|`` for l1) let a gated layer skip its pass over the input: ``x_sums``
        (N, C) are ``x``'s for this call's ``saliency``, as the layer that wrote ``x`` computed
        them; ``out_sums`` (N, Cout), if given, receives the output's (after the epilogue, of
        ``out_sums_kind``), computed in the epilogue from the values stored."""
        out = _nhwc_output(x, self.cin, self.cout, self.out_size, f"the layer's {self.kernel} window")
        n, c, h, w = x.shape
        if residual is not None and not (
                residual.shape == out.shape and residual.dtype == torch.float32
                and residual.device.type == "cpu"
                and residual.is_contiguous(memory_format=torch.channels_last)):
            raise DataError(f"the residual must be a channels-last float32 CPU tensor of the output's "
                            f"shape {tuple(out.shape)}, got {residual.dtype} {tuple(residual.shape)}")
        if mode == DENSE:
            sptr = None
        elif mode in (0, 1):  # gated_conv.THRESHOLD, gated_conv.TOPK
            if saliency not in (0, 1):
                raise ConfigError(f"unknown saliency code {saliency} (0: l2, 1: l1)")
            if scale is None or scale.dtype != torch.float32 or not scale.is_contiguous() \
                    or scale.numel() != c:
                raise DataError(f"gated modes need scale: a contiguous float32 tensor of {c} entries")
            sptr = scale.data_ptr()
        else:
            raise ConfigError(f"unknown mode {mode} (DENSE, gated_conv.TOPK or gated_conv.THRESHOLD)")
        if counts is not None and (counts.dtype != torch.int64 or not counts.is_contiguous()
                                   or counts.numel() != n):
            raise DataError(f"counts must be a contiguous int64 tensor of {n} entries")
        _check_sums(x_sums, "x_sums", (n, c))
        _check_sums(out_sums, "out_sums", (n, self.cout))
        args = (self._ref, x.data_ptr(), n, h, w, sptr, saliency, mode, threshold, k,
                None if counts is None else counts.data_ptr(), out.data_ptr(),
                None if residual is None else residual.data_ptr(), clamp[0], clamp[1],
                _sums(x_sums if mode != DENSE else None, out_sums, out_sums_kind))
        NativeLayer._run(_lib.ispc_conv_nhwc, args)
        return out

    def run(self, x: Tensor, mode: int, scale: Tensor | None, threshold: float, k: int,
            saliency: int, residual: Tensor | None, clamp: tuple[float, float],
            x_sums: Tensor | None = None, out_sums: Tensor | None = None,
            out_sums_kind: int = 0) -> Tensor:
        """:meth:`__call__` without its argument checks, for callers that made them (a gated
        layer's forward: every check costs each layer of a batch-1 model microseconds). ``x``
        channels-last float32 CPU with this layer's channels, ``scale`` a contiguous float32
        tensor of them (gated modes), ``residual`` None or channels-last float32 of the output's
        shape, ``mode`` and ``saliency`` valid codes; ``x_sums`` / ``out_sums`` as in
        :meth:`__call__`, contiguous float32 (N, C) / (N, Cout), ``out_sums_kind`` a valid code."""
        n, _, h, w = x.shape
        shape = self._shapes.get((n, h, w)) or self.out_shape(n, h, w)
        out = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
        sums = None if x_sums is None and out_sums is None else _sums(
            x_sums if mode != DENSE else None, out_sums, out_sums_kind)
        NativeLayer._run(_lib.ispc_conv_nhwc, (
            self._ref, x.data_ptr(), n, h, w, None if mode == DENSE else scale.data_ptr(), saliency,
            mode, threshold, k, None, out.data_ptr(), None if residual is None else residual.data_ptr(),
            clamp[0], clamp[1], sums))
        return out

    def out_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        """The output shape for ``n`` inputs of ``h x w`` (cached per size)."""
        shape = self._shapes.get((n, h, w))
        if shape is None:
            shape = self._shapes[(n, h, w)] = (n, self.cout, *self.out_size(h, w))
        return shape


def _check_nhwc(x: Tensor, name: str) -> None:
    if not (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last)):
        raise DataError(f"{name} must be a channels-last float32 CPU map (N, C, H, W), got {x.dtype} "
                        f"{tuple(x.shape)} on {x.device}; use {name}.contiguous(memory_format="
                        "torch.channels_last)")


def _nhwc_output(x: Tensor, cin: int, cout: int, out_size, window: str) -> Tensor:
    """The checked call's output map for ``x`` (channels-last float32 CPU with ``cin`` channels,
    at least the ``window`` of ``out_size``): empty, channels-last, ``cout`` channels."""
    _check_nhwc(x, "x")
    n, c, h, w = x.shape
    if c != cin:
        raise DataError(f"x has {c} channels, the layer takes {cin}")
    ho, wo = out_size(h, w)
    if ho < 1 or wo < 1:
        raise DataError(f"a {h}x{w} input is smaller than {window}")
    return torch.empty((n, cout, ho, wo), dtype=torch.float32, memory_format=torch.channels_last)


class DepthwiseConv3x3:
    """A depthwise 3x3 convolution (groups = channels, one filter per channel) on channels-last
    maps, with the bias, an optional residual and a clamp fused (MobileNet's, ReLU6 included)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
                 padding: int = 1) -> None:
        _loaded()
        if weight.dim() != 4 or tuple(weight.shape[1:]) != (1, 3, 3):
            raise ConfigError(f"weight must be (C, 1, 3, 3) (depthwise 3x3), got {tuple(weight.shape)}")
        if not (isinstance(stride, int) and isinstance(padding, int) and stride >= 1 and padding >= 0):
            raise ConfigError(f"stride must be an int >= 1 and padding an int >= 0, got {stride!r}, "
                              f"{padding!r} (the same along both axes)")
        self.channels = int(weight.shape[0])
        self.stride, self.padding = stride, padding
        # [tap][C]: one tap's weights for a block of channels are one vector
        self.packed = weight.detach().to("cpu", torch.float32).reshape(self.channels, 9).t().contiguous()
        if bias is not None and bias.numel() != self.channels:
            raise ConfigError(f"bias has {bias.numel()} entries for {self.channels} channels")
        self.bias = (torch.zeros(self.channels) if bias is None
                     else bias.detach().to("cpu", torch.float32).contiguous().clone())

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        s, p = self.stride, self.padding
        return (h + 2 * p - 3) // s + 1, (w + 2 * p - 3) // s + 1

    def __call__(self, x: Tensor, *, residual: Tensor | None = None,
                 clamp: tuple[float, float] = NO_CLAMP, out_sums: Tensor | None = None,
                 out_sums_kind: int = 0) -> Tensor:
        """The layer on ``x``; ``out_sums`` (N, C), if given, receives the output's saliency sums
        (as :meth:`NhwcConv.__call__`'s)."""
        out = _nhwc_output(x, self.channels, self.channels, self.out_size, "the 3x3 window")
        n, c, h, w = x.shape
        if residual is not None:
            _check_nhwc(residual, "residual")
            if residual.shape != out.shape:
                raise DataError(f"the residual must have the output's shape {tuple(out.shape)}, got "
                                f"{tuple(residual.shape)}")
        _check_sums(out_sums, "out_sums", (n, c))
        NativeLayer._run(_lib.ispc_dwconv3x3_nhwc, (
            x.data_ptr(), n, h, w, c, self.packed.data_ptr(), self.bias.data_ptr(), self.stride,
            self.padding, out.data_ptr(), None if residual is None else residual.data_ptr(),
            clamp[0], clamp[1], _sums(None, out_sums, out_sums_kind)))
        return out

    def run(self, x: Tensor, residual: Tensor | None, clamp: tuple[float, float],
            out_sums: Tensor | None = None, out_sums_kind: int = 0) -> Tensor:
        """:meth:`__call__` without its argument checks, for callers that made them (``x``
        channels-last float32 CPU with these channels, ``residual`` None or channels-last float32
        of the output's shape, ``out_sums`` None or contiguous float32 (N, C))."""
        n, c, h, w = x.shape
        out = torch.empty((n, c, *self.out_size(h, w)), dtype=torch.float32,
                          memory_format=torch.channels_last)
        NativeLayer._run(_lib.ispc_dwconv3x3_nhwc, (
            x.data_ptr(), n, h, w, c, self.packed.data_ptr(), self.bias.data_ptr(), self.stride,
            self.padding, out.data_ptr(), None if residual is None else residual.data_ptr(),
            clamp[0], clamp[1], None if out_sums is None else _sums(None, out_sums, out_sums_kind)))
        return out


# --- pooling and the input's layout on channels-last maps (the C file's last sections) ----------

#: the libraries whose pooling entries are declared: weak, so a variant library built later (the
#: tests' AVX2 and small-window builds) never inherits a collected one's mark (an id() reused)
_POOLS_BOUND: weakref.WeakSet = weakref.WeakSet()


def _pool_lib() -> ctypes.CDLL:
    """The library with its pooling entries' signatures declared (once per library; their own
    section, apart from the convolution entries' declarations)."""
    lib = _loaded()
    if lib not in _POOLS_BOUND:
        lib.ispc_maxpool_nhwc.restype = lib.ispc_avgpool_global_nhwc.restype = _i64
        lib.ispc_maxpool_nhwc.argtypes = [_ptr] + [_i64] * 10 + [ctypes.c_float, ctypes.c_float,
                                                                 _ptr, _i64]
        lib.ispc_avgpool_global_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64]
        lib.ispc_nchw_to_nhwc.restype = _i64
        lib.ispc_nchw_to_nhwc.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64]
        _POOLS_BOUND.add(lib)
    return lib


def maxpool_nhwc(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], clamp: tuple[float, float] = NO_CLAMP) -> Tensor:
    """``clamp(max_pool2d(x, kernel, stride, padding), *clamp)`` for a channels-last float32 CPU
    ``x`` (N, C, H, W), floor mode, no dilation, padding at most half the kernel (as max_pool2d
    requires); the result channels-last. One pass over ``x``, NaN propagating; a clamp commutes
    with the max (exact)."""
    _check_nhwc(x, "x")
    (kh, kw), (sh, sw), (ph, pw) = (_pair_arg(kernel, "kernel"), _pair_arg(stride, "stride"),
                                    _pair_arg(padding, "padding"))
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or 2 * ph > kh or 2 * pw > kw:
        raise ConfigError(f"max-pool kernel {kh}x{kw}, stride {sh}x{sw}, padding {ph}x{pw}: kernel "
                          "and stride must be >= 1 and padding at most half the kernel")
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise DataError(f"a {h}x{w} input is smaller than the {kh}x{kw} pooling window")
    out = torch.empty((n, c, ho, wo), dtype=torch.float32, memory_format=torch.channels_last)
    _pool_lib().ispc_maxpool_nhwc(x.data_ptr(), n, h, w, c, kh, kw, sh, sw, ph, pw, clamp[0],
                                  clamp[1], out.data_ptr(), torch.get_num_threads())
    return out


def avgpool_global_nhwc(x: Tensor) -> Tensor:
    """``adaptive_avg_pool2d(x, 1)`` of a channels-last float32 CPU ``x`` (N, C, H, W): (N, C, 1,
    1) channels-last, each channel's mean over the positions (float sums in position order, then
    divided, as PyTorch's channels-last kernel; equal to within rounding)."""
    _check_nhwc(x, "x")
    n, c, h, w = x.shape
    if h * w == 0:
        raise DataError(f"a {h}x{w} map has no positions to average")
    out = torch.empty((n, c, 1, 1), dtype=torch.float32, memory_format=torch.channels_last)
    _pool_lib().ispc_avgpool_global_nhwc(x.data_ptr(), n, h * w, c, out.data_ptr(),
                                         torch.get_num_threads())
    return out


#: most channels :func:`to_channels_last` converts (an image's: the C loop is per position)
TO_CHANNELS_LAST_MAX = 16


def to_channels_last(x: Tensor) -> Tensor:
    """``x.contiguous(memory_format=torch.channels_last)`` of a contiguous float32 CPU ``x``
    (N, C, H, W) with at most :data:`TO_CHANNELS_LAST_MAX` channels (a model's input image): the
    same values, copied in one pass."""
    if not (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous()):
        raise DataError(f"x must be a contiguous float32 CPU map (N, C, H, W), got {x.dtype} "
                        f"{tuple(x.shape)} on {x.device}")
    n, c, h, w = x.shape
    if c > TO_CHANNELS_LAST_MAX:
        raise DataError(f"x has {c} channels; to_channels_last takes at most "
                        f"{TO_CHANNELS_LAST_MAX} (use x.contiguous(memory_format=torch.channels_last))")
    out = torch.empty((n, c, h, w), dtype=torch.float32, memory_format=torch.channels_last)
    _pool_lib().ispc_nchw_to_nhwc(x.data_ptr(), n, c, h * w, out.data_ptr(), torch.get_num_threads())
    return out


# --- a chain of channels-last layers in one C call (the C file's last section) ------------------

class _Op(ctypes.Structure):
    """``ispc_op_t``: one entry of :class:`OpProgram`."""

    _fields_ = ([(f, _i64) for f in ("kind", "x", "out", "res", "N", "H", "W", "C")]
                + [("layer", _ptr), ("w", _ptr), ("bias", _ptr)]
                + [(f, _i64) for f in ("kh", "kw", "sh", "sw", "ph", "pw")]
                + [("scale", _ptr), ("saliency", _i64), ("mode", _i64), ("k", _i64),
                   ("threshold", ctypes.c_float), ("lo", ctypes.c_float), ("hi", ctypes.c_float),
                   ("sums_in", _i64), ("sums_out", _i64), ("sums_kind", _i64), ("chunk", _i64),
                   ("local", _i64), ("lo2", ctypes.c_float), ("hi2", ctypes.c_float),
                   ("outs", _i64), ("layer2", _ptr)]
                + [(f, _i64) for f in ("x2", "H2", "W2", "C2")]
                + [("scale2", _ptr), ("saliency2", _i64), ("mode2", _i64), ("k2", _i64),
                   ("threshold2", ctypes.c_float), ("sums_in2", _i64)])


_OP_CONV, _OP_DW, _OP_AVGPOOL, _OP_TO_NHWC, _OP_MAXPOOL, _OP_EXPAND_DW, _OP_LINEAR, _OP_LINEAR_T = range(8)
_OP_EXPAND_DW_CH = 8
_OP_CONV_MAXPOOL = 9
_OP_CONV_PAIR = 10
#: the most kernel rows of a max-pool that :meth:`OpProgram.add_conv_maxpool` fuses
CONV_MAXPOOL_ROWS = 64
#: output features per block of :meth:`OpProgram.add_linear`'s packed weights (``LIN_B``)
LINEAR_BLOCK = 64
_LOCAL = {"x": 1, "out": 2, "res": 4, "x2": 8}  # OP_LOCAL_*


def pointwise(layer: NhwcConv) -> bool:
    """Whether ``layer`` is a plain 1x1 convolution (stride 1, no padding, no dilation): what
    :meth:`OpProgram.add_expand_dw` takes as an expansion on any map."""
    return (layer.kernel, layer.stride, layer.padding, layer.dilation) == ((1, 1), (1, 1), (0, 0), (1, 1))


def expand_dw_fits(layer: NhwcConv, h: int) -> bool:
    """Whether :meth:`OpProgram.add_expand_dw` can compute ``layer``'s output rows a window at a
    time from ``h`` input rows: top padding under one stride (only the map's first window reads
    it) and no output row reading the bottom padding."""
    (kh, _), (sh, _), (ph, _), (dh, _) = layer.kernel, layer.stride, layer.padding, layer.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    return ho >= 1 and (ph == 0 or ph < sh) and (ho - 1) * sh - ph + (kh - 1) * dh <= h - 1


class OpProgram:
    """Channels-last layers run in order by one C call (``ispc_run_ops``), each with exactly the
    arguments its own call passes (:meth:`NhwcConv.run`, :meth:`DepthwiseConv3x3.run`, the pools,
    :func:`to_channels_last`), so the results are the same; a compiled model's per-layer Python
    (module call, checks, argument conversion: ~30 us a layer) is paid once per call instead.

    Maps live in numbered *slots*: the caller gives one pointer per slot to :meth:`run`. Each
    ``add_*`` takes the slots it reads and writes and the input map's shape (N, C, H, W); the
    caller checks shapes (these entries trust them). It holds the layers and tensors it points to.
    """

    def __init__(self) -> None:
        _loaded()
        self._ops: list[_Op] = []
        self._keep: list = []  # what the ops point into
        self._array = None

    def __len__(self) -> int:
        return len(self._ops)

    def _add(self, kind: int, x: int, out: int, shape, **fields) -> None:
        n, c, h, w = shape
        self._ops.append(_Op(kind=kind, x=x, out=out, res=fields.pop("res", -1), N=n, C=c, H=h, W=w,
                             sums_in=fields.pop("sums_in", -1), sums_out=fields.pop("sums_out", -1),
                             **fields))
        self._array = None

    def add_conv(self, layer: NhwcConv, x: int, out: int, shape, mode: int = DENSE,
                 scale: Tensor | None = None, threshold: float = 0.0, k: int = 0, saliency: int = 0,
                 res: int = -1, clamp: tuple[float, float] = NO_CLAMP, sums_in: int = -1,
                 sums_out: int = -1, sums_kind: int = 0) -> None:
        """:meth:`NhwcConv.run` (``sums_in``: only read in gated modes, as there)."""
        self._keep += [layer, scale]
        self._add(_OP_CONV, x, out, shape, layer=ctypes.addressof(layer._struct),
                  scale=None if mode == DENSE else scale.data_ptr(), saliency=saliency, mode=mode,
                  k=k, threshold=threshold, res=res, lo=clamp[0], hi=clamp[1],
                  sums_in=sums_in if mode != DENSE else -1, sums_out=sums_out, sums_kind=sums_kind)

    def add_depthwise(self, layer: DepthwiseConv3x3, x: int, out: int, shape, res: int = -1,
                      clamp: tuple[float, float] = NO_CLAMP, sums_out: int = -1,
                      sums_kind: int = 0) -> None:
        """:meth:`DepthwiseConv3x3.run`."""
        self._keep.append(layer)
        self._add(_OP_DW, x, out, shape, w=layer.packed.data_ptr(), bias=layer.bias.data_ptr(),
                  sh=layer.stride, ph=layer.padding, res=res, lo=clamp[0], hi=clamp[1],
                  sums_out=sums_out, sums_kind=sums_kind)

    def add_expand_dw(self, layer: NhwcConv, dw: DepthwiseConv3x3, x: int, out: int, shape,
                      mode: int = DENSE, scale: Tensor | None = None, threshold: float = 0.0,
                      k: int = 0, saliency: int = 0, clamp: tuple[float, float] = NO_CLAMP,
                      dw_clamp: tuple[float, float] = NO_CLAMP, res: int = -1, sums_in: int = -1,
                      sums_out: int = -1, sums_kind: int = 0, by_channels: bool = False) -> None:
        """A convolution (``layer``, as :meth:`add_conv` without a residual or output sums: a 1x1
        expansion, or one that :func:`expand_dw_fits`, e.g. MobileNetV2's stem) and the depthwise
        layer ``dw`` on its output (as :meth:`add_depthwise`: ``res``, ``sums_out``) in one op:
        the expanded map stays in each thread's cache, never written whole. Same results as the
        two ops (``sums_out`` within float rounding where ``by_channels``). Threads split the
        output rows, or with ``by_channels`` (1x1 expansions) the expanded channels (for small
        maps: no rows computed twice, each thread reads only its channels' weights)."""
        if not (pointwise(layer) or (not by_channels and expand_dw_fits(layer, shape[2]))):
            raise ConfigError("add_expand_dw takes a 1x1 convolution of stride 1 without padding, or "
                              "(not by_channels) one whose rows expand_dw_fits")
        if dw.channels != layer.cout:
            raise ConfigError(f"the depthwise layer has {dw.channels} channels, the 1x1 layer gives "
                              f"{layer.cout}")
        self._keep += [layer, dw, scale]
        self._add(_OP_EXPAND_DW_CH if by_channels else _OP_EXPAND_DW, x, out, shape,
                  layer=ctypes.addressof(layer._struct),
                  scale=None if mode == DENSE else scale.data_ptr(), saliency=saliency, mode=mode,
                  k=k, threshold=threshold, res=res, lo=clamp[0], hi=clamp[1],
                  sums_in=sums_in if mode != DENSE else -1, sums_out=sums_out, sums_kind=sums_kind,
                  w=dw.packed.data_ptr(), bias=dw.bias.data_ptr(), sh=dw.stride, ph=dw.padding,
                  lo2=dw_clamp[0], hi2=dw_clamp[1])

    def add_linear(self, weight: Tensor, bias: Tensor | None, x: int, out: int, n: int) -> None:
        """A fully connected layer (``F.linear``) on slot ``x``'s (n, in_features) features, into
        slot ``out``'s (n, out_features). Each output sums its terms in input order, then adds the
        bias: the same values on AVX-512 and AVX2, within float rounding of ``F.linear``'s."""
        if not (weight.dtype == torch.float32 and weight.dim() == 2 and weight.device.type == "cpu"
                and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"
                                      and tuple(bias.shape) == (weight.shape[0],)))):
            raise ConfigError("add_linear takes a float32 CPU weight (out, in) and bias (out,) or None")
        o, c = weight.shape
        blocks = -(-o // LINEAR_BLOCK)
        packed = torch.zeros(blocks * LINEAR_BLOCK, c, dtype=torch.float32)
        packed[:o] = weight.detach()
        packed = packed.view(blocks, LINEAR_BLOCK, c).transpose(1, 2).contiguous()
        padded = None
        if bias is not None:
            padded = torch.zeros(blocks * LINEAR_BLOCK, dtype=torch.float32)
            padded[:o] = bias.detach()
        self._keep += [packed, padded]
        self._add(_OP_LINEAR, x, out, (n, c, 1, 1), w=packed.data_ptr(),
                  bias=None if padded is None else padded.data_ptr(), outs=o)

    def add_linear_input_major(self, weight_t: Tensor, bias: Tensor | None, x: int, out: int, shape,
                               clamp: tuple[float, float] = NO_CLAMP) -> None:
        """``clamp(F.linear(x.flatten(1), weight_t.t(), bias))`` on slot ``x``'s map of ``shape``
        (N, C, H, W; channels-last, flattened in NCHW order as ``flatten(1)`` does; H = W = 1 for
        (N, C) features) into slot ``out``'s (N, out_features). ``weight_t`` is the weight
        input-major, (in, out) contiguous, read in place (a module's weight can be its transposed
        view: one copy). Inputs that are zero in every instance are skipped with their weight
        rows; each output sums the other terms in input order, then adds the bias: the same values
        on AVX-512 and AVX2, within float rounding of ``F.linear``'s."""
        n, c, h, w = shape
        if not (weight_t.dtype == torch.float32 and weight_t.dim() == 2 and weight_t.is_cpu
                and weight_t.is_contiguous() and weight_t.shape[0] == c * h * w
                and weight_t.shape[1] >= 1
                and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu
                                      and bias.is_contiguous()
                                      and tuple(bias.shape) == (weight_t.shape[1],)))):
            raise ConfigError("add_linear_input_major takes a contiguous float32 CPU weight (in, out) "
                              "with in = C*H*W of the input map, and a bias (out,) or None")
        self._keep += [weight_t, bias]
        self._add(_OP_LINEAR_T, x, out, shape, w=weight_t.data_ptr(),
                  bias=None if bias is None else bias.data_ptr(), outs=weight_t.shape[1],
                  lo=clamp[0], hi=clamp[1])

    def add_avgpool_global(self, x: int, out: int, shape) -> None:
        """:func:`avgpool_global_nhwc`."""
        self._add(_OP_AVGPOOL, x, out, shape)

    def add_to_channels_last(self, x: int, out: int, shape) -> None:
        """:func:`to_channels_last` (at most :data:`TO_CHANNELS_LAST_MAX` channels)."""
        if shape[1] > TO_CHANNELS_LAST_MAX:
            raise ConfigError(f"to_channels_last takes at most {TO_CHANNELS_LAST_MAX} channels")
        self._add(_OP_TO_NHWC, x, out, shape)

    def add_maxpool(self, x: int, out: int, shape, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], clamp: tuple[float, float] = NO_CLAMP) -> None:
        """:func:`maxpool_nhwc`."""
        self._add(_OP_MAXPOOL, x, out, shape, kh=kernel[0], kw=kernel[1], sh=stride[0],
                  sw=stride[1], ph=padding[0], pw=padding[1], lo=clamp[0], hi=clamp[1])

    def add_conv_maxpool(self, layer: NhwcConv, x: int, out: int, shape, kernel: tuple[int, int],
                         stride: tuple[int, int], padding: tuple[int, int],
                         clamp: tuple[float, float] = NO_CLAMP,
                         pool_clamp: tuple[float, float] = NO_CLAMP) -> None:
        """A dense convolution (:meth:`add_conv` without a residual or sums) and the max-pool on
        its output (:meth:`add_maxpool`'s window and ``pool_clamp``) in one op: the convolution's
        map stays in each thread's cache, never written whole (ResNet's stem). Same results as the
        two ops."""
        if not 1 <= kernel[0] <= CONV_MAXPOOL_ROWS:
            raise ConfigError(f"add_conv_maxpool takes pools of 1 to {CONV_MAXPOOL_ROWS} kernel rows, "
                              f"got {kernel[0]}")
        self._keep.append(layer)
        self._add(_OP_CONV_MAXPOOL, x, out, shape, layer=ctypes.addressof(layer._struct), mode=DENSE,
                  lo=clamp[0], hi=clamp[1], kh=kernel[0], kw=kernel[1], sh=stride[0], sw=stride[1],
                  ph=padding[0], pw=padding[1], lo2=pool_clamp[0], hi2=pool_clamp[1])

    def add_conv_pair(self, first: NhwcConv, second: NhwcConv, x: int, x2: int, mid: int,
                      out: int, shape, shape2, mode: int, scale: Tensor | None, threshold: float,
                      k: int, saliency: int, sums_in: int, mode2: int, scale2: Tensor | None,
                      threshold2: float, k2: int, saliency2: int, sums_in2: int,
                      clamp: tuple[float, float] = NO_CLAMP, sums_out: int = -1,
                      sums_kind: int = 0) -> None:
        """Two convolutions summed: ``first`` on slot ``x``'s map of ``shape`` into slot ``mid``
        (no clamp, no output sums), then ``second`` on slot ``x2``'s of ``shape2`` with ``mid`` as
        its residual (``clamp``, ``sums_out``) into slot ``out``; each with its own gate (the
        arguments of :meth:`add_conv`, ``...2`` the second's). The same results as the two
        :meth:`add_conv` calls. Where both are 1x1 layers without padding of the same output map
        and register tile, at batch 1, whose weights fit the kernel's budget (``PAIR_BYTES``),
        each tile of the first stays in cache as the second's residual and ``mid`` is never
        written (a ResNet block's last 1x1 and its downsample); otherwise the two run in turn."""
        if first.cout != second.cout:
            raise ConfigError(f"add_conv_pair takes layers of equal outputs, got {first.cout} and "
                              f"{second.cout}")
        if first.out_size(*shape[2:]) != second.out_size(*shape2[2:]) or shape[0] != shape2[0]:
            raise ConfigError("add_conv_pair's layers must make maps of the same shape")
        n2, c2, h2, w2 = shape2
        self._keep += [first, second, scale, scale2]
        self._add(_OP_CONV_PAIR, x, out, shape, layer=ctypes.addressof(first._struct),
                  scale=None if mode == DENSE else scale.data_ptr(), saliency=saliency, mode=mode,
                  k=k, threshold=threshold, res=mid, lo=clamp[0], hi=clamp[1],
                  sums_in=sums_in if mode != DENSE else -1, sums_out=sums_out, sums_kind=sums_kind,
                  layer2=ctypes.addressof(second._struct), x2=x2, H2=h2, W2=w2, C2=c2,
                  scale2=None if mode2 == DENSE else scale2.data_ptr(), saliency2=saliency2,
                  mode2=mode2, k2=k2, threshold2=threshold2,
                  sums_in2=sums_in2 if mode2 != DENSE else -1)

    def set_chunk(self, index: int, instances: int, local: tuple[str, ...] = ()) -> None:
        """Op ``index`` runs ``instances`` instances at a time (0: the whole batch at once); a run
        of consecutive ops with the same chunk runs chunk by chunk through all of them, so that
        the maps between them stay in cache. Each op then computes as its own call on that chunk
        would (the same results as the per-layer calls chunk by chunk). ``local`` names the op's
        maps (``"x"``, ``"out"``, ``"res"``) whose slots hold one chunk only, the same for every
        chunk: maps made and used inside the run, whose buffers then stay in cache."""
        if instances < 0:
            raise ConfigError(f"instances must be >= 0, got {instances}")
        unknown = set(local) - set(_LOCAL)
        if unknown:
            raise ConfigError(f"local names maps of {sorted(_LOCAL)}, got {sorted(unknown)}")
        self._ops[index].chunk = instances
        self._ops[index].local = sum(_LOCAL[k] for k in set(local))
        self._array = None

    def chunks(self) -> list[int]:
        """Each op's instances per pass (:meth:`set_chunk`)."""
        return [op.chunk for op in self._ops]

    def run(self, slots, times=None) -> None:
        """Run every op; ``slots``: a ctypes array of pointers (``slot_array``), one per slot.
        ``times`` (a float64 tensor of one entry per op; a profiling aid, not thread-safe) gets
        each op's seconds added."""
        lib = _run_ops_lib()
        if self._array is None:
            self._array = (_Op * len(self._ops))(*self._ops)
        args = (self._array, len(self._ops), slots)
        if times is not None:
            if times.dtype != torch.float64 or times.numel() != len(self._ops) \
                    or not times.is_contiguous():
                raise DataError(f"times must be a contiguous float64 tensor of {len(self._ops)} entries")
            lib.ispc_run_ops_times(times.data_ptr())
        try:
            need = NativeLayer._call(lib.ispc_run_ops, args)
        finally:
            if times is not None:
                lib.ispc_run_ops_times(None)
        if need:
            raise ConfigError(f"ispc_run_ops refused the program (code {need}): an unknown op")

    def entry(self) -> tuple[Any, Any, int]:
        """``(fn, ops, count)``: :meth:`run` without its Python, for callers that make the call
        themselves: ``fn(ops, count, slots, *workspace_args(), torch.get_num_threads())``; a
        positive return asks for that many floats of workspace (``_workspace``) and the call
        again, a negative one is a refusal."""
        if self._array is None:
            self._array = (_Op * len(self._ops))(*self._ops)
        return _run_ops_lib().ispc_run_ops, self._array, len(self._ops)

    @staticmethod
    def slot_array(count: int):
        """A ctypes array of ``count`` slot pointers, for :meth:`run` (fill it with data_ptr()s)."""
        return (_ptr * count)()


_RUN_OPS_BOUND: weakref.WeakSet = weakref.WeakSet()  # as _POOLS_BOUND


def _run_ops_lib() -> ctypes.CDLL:
    lib = _pool_lib()
    if lib not in _RUN_OPS_BOUND:
        lib.ispc_run_ops.restype = _i64
        lib.ispc_run_ops.argtypes = [ctypes.POINTER(_Op), _i64, ctypes.POINTER(_ptr), _ptr, _i64, _i64]
        lib.ispc_run_ops_times.restype = None
        lib.ispc_run_ops_times.argtypes = [_ptr]
        _RUN_OPS_BOUND.add(lib)
    return lib
