"""Shared test set-up: make ``tests/`` importable (for ``zoo``) and keep runs deterministic."""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw the same examples on every run and machine: a failure in CI is reproducible
# here, and a pass does not depend on luck. HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_dense_runtimes(request, monkeypatch):
    """Compiles run as where no dense runtime (ONNX Runtime, OpenVINO) is installed, so that the
    default ``GatingConfig.dense_route="auto"`` leaves the gated model the tests inspect (and no
    test pays an ONNX export); tests marked ``dense_runtimes`` see what is installed."""
    if request.node.get_closest_marker("dense_runtimes") is None:
        from ispc import dense_route

        monkeypatch.setattr(dense_route, "installed", lambda runtime: False)
    yield


@pytest.fixture
def avx2_native(monkeypatch):
    """The native library built for AVX2 only (``-mno-avx512f``), in place of the default one for
    the test: this CPU may run the AVX-512 build, and the AVX2 one (16 registers: other register
    blocks and tiles) must be right too. Skips where it cannot be built."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants")
    from ispc.ops import native

    try:
        lib = native._build(("-mno-avx512f",))
    except RuntimeError as exc:
        pytest.skip(f"cannot build the AVX2 variant: {exc}")
    monkeypatch.setattr(native, "_lib", lib)
    return lib


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the kernels are held to."""
    denom = b.abs().max().clamp_min(1e-12)
    return float(((a - b).abs().max() / denom).detach())


def threshold_between(saliency: torch.Tensor, keep: float) -> float:
    """A threshold that drops about ``1 - keep`` of the saliencies, placed halfway between two of
    them: one placed on a saliency would make the test depend on its last bit, which the kernel
    (vectorized sums) and the reference (torch's norm) are free to round differently."""
    v = saliency.flatten().double().sort().values
    j = min(int(round((1.0 - keep) * v.numel())), v.numel())
    if j == 0:
        return float(v[0]) * 0.5
    if j == v.numel():
        return float(v[-1]) * 2.0 + 1.0
    return float(v[j - 1] + v[j]) * 0.5


def gated_layer_errors(compiled, x: torch.Tensor) -> dict[str, float]:
    """Each gated layer's relative error against its masked-dense reference on the input it saw
    in one call of ``compiled`` (inputs include a fused residual)."""
    seen = {}
    hooks = [m.register_forward_hook(
        lambda mod, a, o, n=n: seen.__setitem__(n, ([t.clone() for t in a], o.clone())))
        for n, m in compiled.gated_modules().items()]
    try:
        with torch.no_grad():
            compiled(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: rel_err(o, compiled.gated_modules()[n].reference(*i)) for n, (i, o) in seen.items()}


def features_only(compiled):
    """``compiled`` with its native programs stopping before the classifier (returned): bit for bit
    its graph's layers, for tests that compare outputs exactly (a classifier inside a program sums
    in another order than ``F.linear``)."""
    from ispc.native_plan import NativePlanRunner

    if isinstance(compiled.__dict__["_runner"], NativePlanRunner):
        compiled.use_runner(NativePlanRunner(compiled.graph_module, classifier=False))
    return compiled
