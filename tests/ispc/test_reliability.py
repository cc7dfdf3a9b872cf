"""Reliability: determinism, reduced precision, channels_last, and the user's model untouched."""
from __future__ import annotations

import pytest
import torch

import ispc
from conftest import rel_err
from ispc.examples.models import resnet20


def _data(seed=0, n=8, batches=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(batches)]


def test_same_inputs_give_same_thresholds_and_report():
    torch.manual_seed(1)
    model = resnet20().eval()
    a = ispc.compile(model, _data(), progress=False)
    b = ispc.compile(model, _data(), progress=False)
    assert a.report.to_dict() == b.report.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_reduced_precision_models(dtype, tol):
    """bf16/fp16 models compile; at keep 1.0 they match the original within the dtype's tolerance,
    and at keep 0.5 every gated layer equals its masked-dense reference in that dtype."""
    model = resnet20().eval().to(dtype)
    x = torch.randn(2, 3, 32, 32).to(dtype)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"{dtype} convolution not supported by this PyTorch build: {exc}")
    full = ispc.compile(model, _data(), progress=False, config=ispc.GatingConfig(keep_ratio=1.0))
    with torch.no_grad():
        out = full(x)
    assert out.dtype == dtype
    assert rel_err(out.float(), ref.float()) <= tol
    half = ispc.compile(model, _data(), progress=False, config=ispc.GatingConfig(keep_ratio=0.5))
    errs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: errs.append(rel_err(o.float(),
                                                                            mod.reference(*a).float())))
             for m in half.gated_modules().values()]
    with torch.no_grad():
        half(x)
    for h in hooks:
        h.remove()
    assert errs and max(errs) <= tol


def test_channels_last_inputs():
    model = resnet20().eval()
    compiled = ispc.compile(model, _data(), progress=False, config=ispc.GatingConfig(keep_ratio=0.5))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = compiled(x)
        b = compiled(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(b, a) <= 1e-5
