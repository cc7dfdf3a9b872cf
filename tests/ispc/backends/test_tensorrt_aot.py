"""The ahead-of-time TensorRT plugins, as far as they run without TensorRT: the kernel
specifications against the kernels' declarations, their compilation to PTX for sm_90 (Triton on
the CPU) and the PTX parameter list TensorRT will bind, the output-shape arithmetic. Registering
and running the plugins needs TensorRT (never done: see ``ispc.backends.tensorrt_aot``)."""
from __future__ import annotations

import importlib.util
import types

import pytest

from ispc.backends import tensorrt_aot as aot
from ispc.ops import gated_conv as gc

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SPECS = {
    "select_threshold_fp32": lambda: aot.select_spec("fp32", 64, 56, 56, gc.THRESHOLD, 0.5, 0,
                                                     gc.SALIENCY_L2),
    "select_topk_bf16_wide": lambda: aot.select_spec("bf16", 1024, 7, 7, gc.TOPK, 0.0, 512,
                                                     gc.SALIENCY_L1),
    "conv_3x3_s2_fp32_tf32": lambda: aot.conv_spec("fp32", 3, 3, (2, 2), (1, 1), (1, 1), "tf32"),
    "conv_1x1_fp16": lambda: aot.conv_spec("fp16", 1, 1, (1, 1), (0, 0), (1, 1)),
}


@needs_triton
@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_follow_the_kernel_declarations(name):
    spec = SPECS[name]()
    fn = aot._kernel_fn(spec.kernel)
    sig = spec.signature
    assert list(sig) == list(fn.arg_names)
    runtime = [n for n, t in sig.items() if t != "constexpr"]
    # TensorRT launches (input pointers, int32 scalars, output pointers): the declaration order
    assert runtime == list(spec.inputs + spec.scalars + spec.outputs)
    assert all(sig[n].startswith("*") for n in spec.inputs + spec.outputs)
    assert all(sig[n] == "i32" for n in spec.scalars)
    declared = {p.name for p in fn.params if p.is_constexpr}
    assert declared <= set(spec.constexprs)


@needs_triton
@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_compile_to_what_tensorrt_binds(name):
    """Triton compiles each spec for an H100/H200 on the CPU; compile_spec checks the PTX's
    parameters (input pointers, int32 scalars, output pointers, then scratch pointers only)."""
    from triton.backends.compiler import GPUTarget

    spec = SPECS[name]()
    try:
        k = aot.compile_spec(spec, GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc).lower():
            pytest.skip(f"Triton cannot assemble for sm_90 here: {exc}")
        raise
    assert k.metadata.name == spec.kernel
    assert k.metadata.shared <= 48 * 1024  # what a launch gets without raising its limit
    assert k.metadata.num_warps == spec.num_warps
    if spec.kernel == "gated_conv_kernel" and spec.constexprs["PRECISION"] != "ieee":
        assert "wgmma" in k.asm["ptx"]


def _fake_compiled(params: list[str], scratch: int = 0):
    body = ",\n".join(f"\t.param .{t} k_param_{i}" for i, t in enumerate(params))
    ptx = f".visible .entry k(\n{body}\n)\n{{\n}}"
    md = types.SimpleNamespace(name="k", global_scratch_size=scratch, profile_scratch_size=0)
    return types.SimpleNamespace(metadata=md, asm={"ptx": ptx})


def test_ptx_parameter_check_refuses_what_tensorrt_would_bind_wrongly():
    spec = aot.KernelSpec("k", {}, inputs=("a", "b"), scalars=("n",), outputs=("o",))
    aot.check_ptx_params(_fake_compiled(["u64", "u64", "u32", "u64", "u64", "u64"]), spec)
    with pytest.raises(RuntimeError, match="PTX parameters"):  # a scalar among the pointers
        aot.check_ptx_params(_fake_compiled(["u64", "u32", "u64", "u64"]), spec)
    with pytest.raises(RuntimeError, match="PTX parameters"):  # a trailing non-pointer
        aot.check_ptx_params(_fake_compiled(["u64", "u64", "u32", "u64", "u32"]), spec)
    with pytest.raises(RuntimeError, match="global_scratch_size"):
        aot.check_ptx_params(_fake_compiled(["u64", "u64", "u32", "u64"], scratch=64), spec)
    assert aot.ptx_params(_fake_compiled(["u64", "u32"]).asm["ptx"], "k") == ["u64", "u32"]


@pytest.mark.parametrize("size,kernel,stride,pad,dil", [(56, 3, 1, 1, 1), (56, 3, 2, 1, 1),
                                                        (7, 1, 2, 0, 1), (13, 5, 1, 4, 2),
                                                        (224, 7, 2, 3, 1)])
def test_output_shape_arithmetic_matches_pytorch(size, kernel, stride, pad, dil):
    assert aot.conv_out(size, kernel, stride, pad, dil) == gc.conv_out_size(size, kernel, stride,
                                                                           pad, dil)


def test_spec_values():
    s = aot.select_spec("fp32", 100, 14, 14, gc.TOPK, 0.0, 400, gc.SALIENCY_L2)
    assert s.constexprs["CP"] == 128 and s.constexprs["k"] == 100  # k clamped to C
    assert s.constexprs["norm"] == pytest.approx(1 / 14)
    assert aot.select_spec("fp32", 8, 4, 4, gc.THRESHOLD, 0.7, 3, gc.SALIENCY_L1).constexprs[
        "norm"] == pytest.approx(1 / 16)
    c = aot.conv_spec("bf16", 3, 3, (1, 2), (1, 0), (1, 1), "ieee")
    assert c.constexprs["PRECISION"] == "none"  # 16-bit maps: their own dot
    assert (c.constexprs["SH"], c.constexprs["SW"], c.constexprs["PW"]) == (1, 2, 0)
    with pytest.raises(ValueError, match="precision"):
        aot.conv_spec("fp32", 3, 3, (1, 1), (1, 1), (1, 1), "fast")
    with pytest.raises(ValueError, match="unsupported"):
        aot.select_spec("fp64", 8, 4, 4, gc.TOPK, 0.0, 3, gc.SALIENCY_L2)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="checks the no-TensorRT path")
def test_registration_declines_without_tensorrt():
    assert aot.register_aot_plugins() is False
