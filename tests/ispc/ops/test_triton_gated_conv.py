"""The Triton kernels of the gated conv: run in Triton's CPU interpreter (TRITON_INTERPRET=1)
against the masked-dense reference, compiled for Hopper (sm_90) by Triton on the CPU, and run on
CUDA where there is one.

The interpreter has to be chosen before triton is first imported, so the interpreted cases run in
one subprocess (which also keeps TRITON_INTERPRET out of this process). The interpreter computes a
TF32 dot in float32 and its bfloat16 dot is wrong (the kernel upcasts there: see
``gated_conv_kernel``), so what TF32 and bfloat16 tensor cores do is checked on a GPU only
(``benchmarks/gpu/run.py``'s ``check``)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import rel_err
from ispc.ops import gated_conv as gc
from ispc.ops import triton_gated_conv as tgc

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed "
                                  "(pip install triton; it installs on CPU-only Linux x86-64)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# name: (N, C, H, W, Cout, kernel, stride, pad, dil, mode, threshold, k, saliency)
CASES = {
    "topk_3x3": (2, 20, 7, 6, 18, 3, 1, 1, 1, gc.TOPK, 0.0, 7, gc.SALIENCY_L2),
    # ~20 of 40 kept: several kept-channel blocks per instance
    "threshold_stride2": (3, 40, 6, 6, 8, 3, 2, 1, 1, gc.THRESHOLD, 0.9, 0, gc.SALIENCY_L2),
    "threshold_dilated_l1": (2, 16, 6, 6, 4, 3, 1, 2, 2, gc.THRESHOLD, 0.7, 0, gc.SALIENCY_L1),
    "topk_1x1_batch1": (1, 17, 5, 5, 5, 1, 1, 0, 1, gc.TOPK, 0.0, 5, gc.SALIENCY_L2),
    # 5x5: the taps unrolled inside the channel loop needed 400 KB of shared memory on an H200
    "threshold_5x5": (2, 20, 7, 7, 12, 5, 1, 2, 1, gc.THRESHOLD, 0.8, 0, gc.SALIENCY_L2),
}

# name: (layout, fused selection, dtype, residual, act); one 3x3 topk layer, 2 x 20 x 5 x 5 -> 16
VARIANTS = {
    "nhwc_fused": ("nhwc", True, "float32", False, None),
    "nhwc_split": ("nhwc", False, "float32", False, None),
    "nchw_split_relu_residual": ("nchw", False, "float32", True, "relu"),
    "nhwc_relu6_residual": ("nhwc", None, "float32", True, "relu6"),
    "bf16_nhwc_relu_residual": ("nhwc", None, "bfloat16", True, "relu"),
    "fp16_nchw_relu6": ("nchw", None, "float16", False, "relu6"),
}
#: relative error of the norm against the float64 reference, per dtype (16-bit: the output's
#: rounding, ~2^-9 for bfloat16)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}

_SCRIPT = r"""
import json, sys, torch
import torch.nn.functional as F
import ispc
out = {"ispc_imported_triton": "triton" in sys.modules,
       "registered": ispc.ops.triton_gated_conv._state["registered"]}
from ispc.ops import gated_conv as gc, triton_gated_conv as tgc
cases, variants = json.loads(sys.argv[1]), json.loads(sys.argv[2])
g = torch.Generator().manual_seed(0)

def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())

def same_selection(idx, cnt, mask):
    got = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        got[i, idx[i, :int(cnt[i])].long()] = True
    return bool(torch.equal(got, mask)) and all(
        bool((idx[i, 1:int(cnt[i])] > idx[i, :int(cnt[i]) - 1]).all()) for i in range(len(cnt)))

# the operator's semantics, NCHW, both selection kernels
for name, (n, c, h, w, cout, kk, st, pd, dl, mode, thr, k, sal) in cases.items():
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(cout, c, kk, kk, generator=g)
    b = torch.randn(cout, generator=g)
    scale = torch.rand(c, generator=g) + 0.5
    args = (st, st, pd, pd, dl, dl, mode, thr, k, sal)
    y = tgc.gated_conv2d_triton(x, wt, b, scale, *args)
    ref = gc.gated_conv2d_reference(x, wt, b, scale, *args)
    mask = gc.channel_mask(x, scale, mode, thr, k, sal)
    sel = [same_selection(*tgc.select_channels(x, scale, mode, thr, k, sal, fused=f), mask)
           for f in ((True, False) if name in ("topk_3x3", "threshold_dilated_l1") else ())]
    out[name] = {"err": float((y - ref).abs().max() / ref.abs().max()),
                 "kept": mask.sum(1).tolist(), "shape_ok": y.shape == ref.shape,
                 "selection": sel}

# layouts, split selection, the fused epilogue, 16-bit maps: against float64
x0 = torch.randn(2, 20, 5, 5, generator=g)
w0 = torch.randn(16, 20, 3, 3, generator=g) / 14
b0, s0 = torch.randn(16, generator=g), torch.rand(20, generator=g) + 0.5
r0 = torch.randn(2, 16, 5, 5, generator=g)
for name, (layout, fused, dt, has_res, act) in variants.items():
    dtype = getattr(torch, dt)
    x, w, b, r = x0.to(dtype), w0.to(dtype), b0.to(dtype), r0.to(dtype)
    m = gc.channel_mask(x, s0, gc.TOPK, 0.0, 9).to(torch.float64)[:, :, None, None]
    ref = F.conv2d(x.double() * m, w.double(), b.double(), 1, 1)
    if has_res:
        ref = ref + r.double()
    ref = ref.clamp_min(0) if act == "relu" else ref.clamp(0, 6) if act == "relu6" else ref
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
    y = tgc.gated_conv2d_cuda(xin, w, b, s0, (1, 1), (1, 1), (1, 1), gc.TOPK, 0.0, 9,
                              residual=r if has_res else None, act=act, fused_select=fused)
    kept = (y.is_contiguous(memory_format=torch.channels_last) if layout == "nhwc"
            else y.is_contiguous())
    out[name] = {"err": rel(y, ref), "dtype_ok": y.dtype == dtype, "layout_kept": kept}

# the partial sums spread over several programs per instance (a larger map, batch 1)
x = torch.randn(1, 8, 24, 24, generator=g)
for mode, thr, k in ((gc.TOPK, 0.0, 3), (gc.THRESHOLD, 0.9, 0)):
    mask = gc.channel_mask(x, torch.ones(8), mode, thr, k)
    out[f"partials_{mode}"] = same_selection(
        *tgc.select_channels(x, torch.ones(8), mode, thr, k, fused=False), mask)

# nothing kept: topk k = 0, and a threshold one instance does not reach (output = bias)
x = torch.randn(2, 12, 5, 5, generator=g)
x[1] *= 1e-3
w, b = torch.randn(6, 12, 3, 3, generator=g), torch.randn(6, generator=g)
bias = b[:, None, None].expand(6, 5, 5)
y0 = tgc.gated_conv2d_cuda(x, w, b, torch.ones(12), (1, 1), (1, 1), (1, 1), gc.TOPK, 0.0, 0)
yt = tgc.gated_conv2d_cuda(x, w, b, torch.ones(12), (1, 1), (1, 1), (1, 1), gc.THRESHOLD, 0.3, 0)
ref = gc.gated_conv2d_reference(x, w, b, torch.ones(12), 1, 1, 1, 1, 1, 1, gc.THRESHOLD, 0.3, 0)
out["nothing_kept"] = {"k0_is_bias": bool(torch.allclose(y0, bias.expand(2, 6, 5, 5))),
                       "kept": gc.channel_mask(x, torch.ones(12), gc.THRESHOLD, 0.3, 0).sum(1).tolist(),
                       "err": rel(yt, ref), "empty_is_bias": bool(torch.allclose(yt[1], bias))}

# per-instance channel sets given directly, one instance keeping nothing
x = torch.randn(3, 12, 5, 5, generator=g); wt = torch.randn(6, 12, 3, 3, generator=g)
b = torch.randn(6, generator=g)
idx = torch.tensor([[0, 3, 4, 11, 0, 0], [1, 2, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0]])
cnt = torch.tensor([4, 6, 0])
y = tgc.gated_conv2d_indexed(x, wt, b, idx, cnt, (1, 1), (1, 1), (1, 1))
m = torch.zeros(3, 12)
for i in range(3):
    m[i, idx[i, :cnt[i]]] = 1
ref = F.conv2d(x * m[:, :, None, None], wt, b, 1, 1)
out["indexed"] = {"err": float((y - ref).abs().max() / ref.abs().max()), "kept": cnt.tolist(),
                  "shape_ok": y.shape == ref.shape,
                  "empty_is_bias": bool(torch.allclose(y[2], b[:, None, None].expand(6, 5, 5)))}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES), json.dumps(VARIANTS)],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stderr:
        # seen with Triton 3.6 and NumPy 2.5 (the lent GPU machine's image): that interpreter holds
        # a loaded scalar as a one-element array, which NumPy 2 will not use as a loop bound
        pytest.skip("this Triton's CPU interpreter cannot bound a loop by a loaded count under "
                    "NumPy 2 (the compiled CUDA kernel is unaffected)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@needs_triton
@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter_matches_reference(interpreted, name):
    r = interpreted[name]
    assert r["shape_ok"]
    assert r["err"] < 1e-5
    c = CASES[name][1]
    assert all(0 < kept < c for kept in r["kept"]), "the case must really drop channels"
    assert all(r["selection"]), "one- and two-launch selection pick the reference's channels"


@needs_triton
def test_interpreter_cases_span_several_tiles(interpreted):
    """The cases exercise every loop and mask: several pixel, output-channel and kept-channel
    blocks."""
    cfg = tgc.INTERPRET_CONFIG
    assert max(max(interpreted[n]["kept"]) for n in CASES) > cfg.block_k
    outs = [gc.conv_out_size(h, kk, st, pd, dl) * gc.conv_out_size(w, kk, st, pd, dl)
            for (_, _, h, w, _, kk, st, pd, dl, *_) in CASES.values()]
    assert max(outs) > cfg.block_m and max(c[4] for c in CASES.values()) > cfg.block_n


@needs_triton
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_interpreter_layouts_epilogue_and_dtypes(interpreted, name):
    r = interpreted[name]
    assert r["dtype_ok"] and r["layout_kept"]
    assert r["err"] < TOLERANCE[VARIANTS[name][2]]


@needs_triton
def test_interpreter_partial_sums_over_several_programs(interpreted):
    assert interpreted[f"partials_{gc.TOPK}"] and interpreted[f"partials_{gc.THRESHOLD}"]


@needs_triton
def test_interpreter_nothing_kept_is_the_bias(interpreted):
    r = interpreted["nothing_kept"]
    assert r["k0_is_bias"] and r["empty_is_bias"]
    assert r["kept"][0] > 0 and r["kept"][1] == 0
    assert r["err"] < 1e-5


@needs_triton
def test_interpreter_per_instance_index_sets(interpreted):
    r = interpreted["indexed"]
    assert r["shape_ok"] and r["err"] < 1e-5 and r["empty_is_bias"]


@needs_triton
def test_import_ispc_registers_without_importing_triton(interpreted):
    assert interpreted["ispc_imported_triton"] is False
    assert interpreted["registered"] is True


def test_kept_indices_match_mask():
    x, scale = torch.randn(4, 10, 5, 5), torch.rand(10) + 0.5
    for mode, thr, k in ((gc.THRESHOLD, 0.8, 0), (gc.TOPK, 0.0, 4)):
        idx, cnt = tgc.kept_indices(x, scale, mode, thr, k)
        mask = gc.channel_mask(x, scale, mode, thr, k)
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
        assert cnt.tolist() == mask.sum(1).tolist()
        for i in range(4):
            row = idx[i, :cnt[i]].long()
            assert torch.equal(row, torch.nonzero(mask[i]).flatten())  # kept, ascending


def test_indexed_refuses_cpu_without_interpreter(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="CUDA"):
        tgc.gated_conv2d_indexed(x, torch.randn(2, 4, 1, 1), torch.zeros(2),
                                 torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="CUDA"):
        tgc.select_channels(x, torch.ones(4), gc.TOPK, 0.0, 2)


def test_pack_weight_rows_per_input_channel_and_tap_cached_by_version():
    w = torch.randn(5, 3, 2, 2)
    p = tgc.pack_weight(w)
    assert p.shape == (3 * 2 * 2, 5) and p.is_contiguous()
    assert torch.equal(p[(2 * 2 + 1) * 2 + 0], w[:, 2, 1, 0])  # row (c, kh, kw) = output channels
    assert tgc.pack_weight(w) is p  # cached
    assert tgc.pack_weight(w, torch.float16).dtype == torch.float16
    with torch.no_grad():
        w.mul_(2)  # an in-place update bumps the version: packed again
    assert torch.equal(tgc.pack_weight(w)[0], w[:, 0, 0, 0])


def test_candidate_tilings_fit_the_layer():
    small = tgc.candidate_configs(torch.float32, m=7 * 7, cout=512)
    assert all(c.block_m <= 64 for c in small) and 0 < len(small) <= tgc.MAX_TUNED
    big = tgc.candidate_configs(torch.float32, m=56 * 56, cout=64)
    assert all(c.block_n <= 64 for c in big) and all(c.block_k == 32 for c in big)
    assert all(c.block_k == 64 for c in tgc.candidate_configs(torch.bfloat16, 3136, 256))
    assert tgc.default_config(torch.float32, 56 * 56, 256) == tgc.CONFIGS_F32[0]


def test_float32_precision_follows_pytorch(monkeypatch):
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        assert tgc.float32_precision() == "ieee"
        return
    before = conv.fp32_precision
    try:
        conv.fp32_precision = "ieee"
        assert tgc.float32_precision() == "ieee"
        conv.fp32_precision = "tf32"
        assert tgc.float32_precision() == "tf32"
    finally:
        conv.fp32_precision = before


def test_serves_plain_eager_cuda_inference_only():
    w = torch.randn(4, 3, 3, 3)
    assert not tgc.serves(torch.randn(1, 3, 5, 5), w)  # a CPU tensor
    if torch.cuda.is_available():
        x = torch.randn(1, 3, 5, 5, device="cuda")
        assert tgc.serves(x, w.cuda()) == (tgc.enabled() and tgc.available())
        assert not tgc.serves(x.requires_grad_(), w.cuda())


def _compile_sm90(kernel, types: dict, consts: dict, **opts):
    """Triton's compiler for an H100/H200 (no GPU needed): the PTX, or a skip without ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ispc.ops import _triton_kernels as tk

    fn = getattr(tk, kernel)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc).lower():
            pytest.skip(f"Triton cannot assemble for sm_90 here: {exc}")
        raise


@needs_triton
@pytest.mark.parametrize("dtype,precision", [("fp32", "tf32"), ("bf16", "none")])
def test_convolution_compiles_to_hopper_tensor_cores(dtype, precision):
    """What the interpreter cannot tell: the kernel compiles for sm_90, its dot runs on the
    tensor cores (wgmma), and its shared memory fits an H100's 227 KB."""
    ptr = f"*{dtype}"
    types = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "idx_ptr": "*i32", "cnt_ptr": "*i32",
             "res_ptr": ptr, "out_ptr": ptr,
             **{n: "i32" for n in "C H W COUT HO WO K_MAX SH SW PH PW DH DW".split()}}
    cfg = (tgc.CONFIGS_F32 if dtype == "fp32" else tgc.CONFIGS_16)[0]
    k = _compile_sm90("gated_conv_kernel", types, dict(
        KH=3, KW=3, LAYOUT=1, HAS_RES=True, ACT=1, PRECISION=precision, UPCAST=False,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert "wgmma" in k.asm["ptx"]
    assert 0 < k.metadata.shared <= 227 * 1024


@needs_triton
def test_selection_compiles_for_hopper():
    types = {"x_ptr": "*fp32", "scale_ptr": "*fp32", "C": "i32", "HW": "i32", "K_MAX": "i32",
             "k": "i32", "threshold": "fp32", "norm": "fp32", "idx_ptr": "*i32", "cnt_ptr": "*i32"}
    k = _compile_sm90("select_fused_kernel", types, dict(MODE=gc.TOPK, SALIENCY=0, LAYOUT=0,
                                                          CP=512, BLOCK_HW=8), num_warps=4)
    assert k.metadata.name == "select_fused_kernel"


@needs_triton
@needs_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_op_dispatches_to_triton(name):
    n, c, h, w, cout, kk, st, pd, dl, mode, thr, k, sal = CASES[name]
    dev = torch.device("cuda")
    x, wt = torch.randn(n, c, h, w, device=dev), torch.randn(cout, c, kk, kk, device=dev)
    b, scale = torch.randn(cout, device=dev), torch.rand(c, device=dev) + 0.5
    args = (st, st, pd, pd, dl, dl, mode, thr, k, sal)
    assert tgc.register_cuda_kernel()
    m = gc.channel_mask(x, scale, mode, thr, k, sal).to(torch.float64)[:, :, None, None]
    ref = torch.nn.functional.conv2d(x.double() * m, wt.double(), b.double(), st, pd, dl)
    y = torch.ops.ispc.gated_conv2d(x, wt, b, scale, *args)
    # float32 as PyTorch's convolutions run it (TF32 by default: ~1e-3 of the norm)
    tol = 1e-5 if tgc.float32_precision() == "ieee" else 5e-3
    assert rel_err(y, ref) < tol
    y2 = tgc.gated_conv2d_cuda(x.contiguous(memory_format=torch.channels_last), wt, b, scale,
                               (st, st), (pd, pd), (dl, dl), mode, thr, k, sal, precision="ieee")
    assert rel_err(y2, ref) < 1e-5


@needs_triton
@needs_cuda
def test_cuda_module_runs_the_fused_epilogue():
    from ispc.modules import GatedConv2d

    dev = torch.device("cuda")
    mod = GatedConv2d(torch.randn(16, 24, 3, 3), torch.randn(16), stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=10).to(dev)
    mod.act = "relu"
    x, res = torch.randn(2, 24, 9, 9, device=dev), torch.randn(2, 16, 9, 9, device=dev)
    with torch.no_grad():
        y = mod(x, res)
        want = mod.reference(x, res)
    assert rel_err(y, want) < 5e-3
