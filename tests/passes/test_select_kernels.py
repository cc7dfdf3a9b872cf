"""select_kernels: predicted kernels by shape; measured mode un-gates layers that do not pay."""
from __future__ import annotations

import torch
from torch import nn

import ispc
from conftest import rel_err
from ispc.examples.models import resnet20


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]


def test_predicted_strategies_follow_shape():
    c = ispc.compile(resnet20().eval(), _data(), progress=False)
    for n in c.graph_module.graph.nodes:
        kernel = n.meta.get("ispc", {}).get("kernel")
        if kernel:
            mod = c.graph_module.get_submodule(n.target)
            hw = n.meta["tensor_meta"].shape[-1] * n.meta["tensor_meta"].shape[-2]
            assert kernel["cost_model"] == "predicted"
            expect = "gemm" if hw <= 196 or mod.weight.shape[-1] == 1 else "gather"
            assert mod.strategy == kernel["strategy"] == expect


def test_latency_aware_ungates_with_reason_and_stays_exact():
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.999, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    # no kernel can save 99.9% of a layer's time: every layer must be left dense, with its timing
    assert c.report.summary["layers_gated"] == 0
    reasons = [r.reason for r in c.report.layers if r.cv is not None]
    assert reasons and all(r.startswith("no measured gain at batch 1") for r in reasons)
    assert not c.gated_modules()
    assert all(isinstance(m, nn.Conv2d) for m in c.graph_module.modules() if hasattr(m, "weight")
               and getattr(m, "weight").dim() == 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(c(x), model(x)) <= 1e-4
    assert c.report.summary["expected_macs"] == c.report.summary["dense_macs"]


def test_latency_aware_keeps_gated_layers_exact():
    model = resnet20().eval()
    cfg = ispc.GatingConfig(latency_aware=True, min_gain=0.0, latency_rounds=3)
    c = ispc.compile(model, _data(), progress=False, config=cfg)
    for name, mod in c.gated_modules().items():
        assert mod.strategy in ("gather", "grouped", "gemm")
    x = torch.randn(2, 3, 32, 32)
    errs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: errs.append(rel_err(o, mod.reference(a[0]))))
             for m in c.gated_modules().values()]
    with torch.no_grad():
        c(x)
    for h in hooks:
        h.remove()
    assert all(e <= 1e-5 for e in errs)
