"""passes/base.py: a failing pass says which it was; records drive module attributes."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import ispc
from ispc.errors import ConfigError, PassError
from ispc.passes import (PASSES, PassState, apply_gate, apply_kernel, build_passes, records,
                         register_pass, run_passes)
from ispc.passes import base
from ispc.pipeline import COMPILE
from ispc.records import GateDecision, KernelChoice


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()


def test_an_unexpected_failure_names_the_pass_and_those_before(monkeypatch):
    def broken(gm, state):
        raise KeyError("no such thing")

    monkeypatch.setitem(PASSES, "broken", broken)
    with pytest.raises(PassError) as info:
        run_passes(_net(), PassState(config=ispc.GatingConfig(mode="topk")),
                   ["capture", "find_sites", "broken", "rank"])
    err = info.value
    assert err.pass_name == "broken" and err.passes_before == ("capture", "find_sites")
    assert "'broken'" in str(err) and "capture, find_sites" in str(err) and "KeyError" in str(err)
    assert isinstance(err.__cause__, KeyError) and isinstance(err, ispc.IspcError)
    assert len(str(err).splitlines()) == 1


def test_an_ispc_error_keeps_its_type_and_message():
    state = PassState(config=ispc.GatingConfig())  # threshold mode without data: rank refuses
    with pytest.raises(ConfigError, match="^threshold mode needs calibration data") as info:
        run_passes(_net(), state, ["capture", "find_sites", "rank"])
    assert info.value.pass_name == "rank"
    assert info.value.passes_before == ("capture", "find_sites")


def test_through_compile_the_user_sees_the_pass(monkeypatch):
    def broken(gm, state):
        raise RuntimeError("boom")

    monkeypatch.setitem(PASSES, "fold_bn", broken)
    with pytest.raises(PassError, match="'fold_bn' failed .*capture.*RuntimeError: boom"):
        ispc.compile(_net(), config=ispc.GatingConfig(mode="topk"), progress=False)


def test_each_pass_sees_the_passes_still_to_run(monkeypatch):
    seen = {}

    def spy(name):
        def fn(gm, state):
            seen[name] = state.pending
            return gm
        return fn

    for name in ("a", "b", "c"):
        monkeypatch.setitem(PASSES, name, spy(name))
    state = PassState(config=ispc.GatingConfig())
    run_passes(_net(), state, ["a", "b", "c"])
    assert seen == {"a": ("b", "c"), "b": ("c",), "c": ()}
    assert state.pending is None  # outside a pipeline again


def test_whole_model_timings_build_what_the_compile_goes_on_to_build(monkeypatch):
    # after kernel choice ispc.compile goes on to swap in dense kernels, fuse and hand sums over
    after = PassState(config=ispc.GatingConfig(), pending=COMPILE[COMPILE.index("select_kernels") + 1:])
    assert build_passes(after) == ("dense_kernels", "fuse_epilogues", "hand_sums")
    last = PassState(config=ispc.GatingConfig(), pending=COMPILE[COMPILE.index("dense_kernels") + 1:])
    assert build_passes(last) == ("fuse_epilogues", "hand_sums")
    # a pass registered as building is picked up with no list to edit
    monkeypatch.setattr(base, "BUILDS", set(base.BUILDS))
    monkeypatch.setattr(base, "PASSES", dict(PASSES))
    register_pass("pack_weights", builds=True)(lambda gm, state: gm)
    assert build_passes(PassState(config=ispc.GatingConfig(), pending=("refine", "pack_weights"))) \
        == ("pack_weights",)
    with pytest.raises(ValueError, match="outside a pipeline"):  # no order to follow
        build_passes(PassState(config=ispc.GatingConfig()))


def test_module_attributes_follow_the_records():
    c = ispc.compile(_net(), [torch.randn(4, 3, 8, 8)], progress=False,
                     config=ispc.GatingConfig(mode="topk", min_channels=8))
    gm = c.graph_module
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "2")
    mod = gm.get_submodule("2")
    gate = records(node).gate
    assert gate.gated and mod.k == gate.k == 8
    apply_gate(node, gate.with_kept(torch.tensor([3.0]), k=3), mod)
    assert mod.k == 3 and records(node).gate.k == 3 and records(node).gate.kept_mean == 3.0
    apply_gate(node, gate.with_kept(torch.tensor([99.0]), k=99), mod)
    assert mod.k == 16  # at most the input channels the layer reads
    apply_kernel(node, KernelChoice(strategy="gemm", cost_model="predicted"), mod)
    assert mod.strategy == "gemm" and c.report.layer("2").gated
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(c(x), _reference(gm, x), atol=1e-5)


def _reference(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    hooks = [m.register_forward_hook(lambda mod, a, o: mod.reference(*a))
             for m in gm.modules() if isinstance(m, ispc.GatedConv2d)]
    try:
        return gm(x)
    finally:
        for h in hooks:
            h.remove()


def test_records_are_created_once_per_node():
    gm = fx.symbolic_trace(_net())
    node = next(iter(gm.graph.nodes))
    assert records(node) is records(node)
    assert records(node).gate is None and records(node).pruning.in_channels == 0
    records(node).gate = GateDecision(gated=False, reason="why not")
    assert node.meta["ispc"].gate.reason == "why not"
