"""ispc.compile / ispc.inspect end to end on the project's models and user-style models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ispc
import zoo
from conftest import rel_err
from ispc.examples import models as M


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics, so folding is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return model.eval()


# name -> (factory, input size); kept small: 2 CPU cores
MODELS = {
    "resnet20": (lambda: M.resnet20(num_classes=10), 32),
    "resnet18": (lambda: M.resnet18(num_classes=10), 64),
    "resnet50": (lambda: M.resnet50(num_classes=10), 64),
    "vgg16_cifar": (lambda: M.vgg16_cifar(num_classes=10), 32),
    "mobilenet_v2_cifar": (lambda: M.mobilenet_v2_cifar(num_classes=10), 32),
}
MODELS.update({f"zoo.{k}": (v, 32) for k, v in zoo.ZOO.items() if k not in MODELS})


def _data(size: int, batches: int = 3, n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(batches)]


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_equals_original(name, mode):
    factory, size = MODELS[name]
    model = _randomize_bn(factory())
    compiled = ispc.compile(model, _data(size, batches=1), progress=False,
                            config=ispc.GatingConfig(keep_ratio=1.0, mode=mode))
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_half_keep_reduces_macs_and_runs(name):
    factory, size = MODELS[name]
    model = _randomize_bn(factory())
    compiled = ispc.compile(model, _data(size), progress=False,
                            config=ispc.GatingConfig(keep_ratio=0.5))
    rep = compiled.report
    s = rep.summary
    gated = rep.gated_layers
    if not gated:  # every layer skipped: each must say why
        assert all(r.reason for r in rep.layers)
        return
    gated_macs = sum(r.macs for r in gated)
    assert s["expected_macs"] == pytest.approx(
        s["dense_macs"] - sum(r.macs * (1 - r.kept_fraction) for r in gated))
    assert s["expected_macs"] < s["dense_macs"] - 0.3 * gated_macs
    for r in rep.layers:
        assert r.gated == (r.reason is None)
    with torch.no_grad():
        for n in (1, 5):
            assert torch.isfinite(compiled(torch.randn(n, 3, size, size))).all()


@pytest.mark.parametrize("name", ["resnet20", "vgg16_cifar", "mobilenet_v2_cifar", "zoo.densenet"])
def test_held_out_kept_fraction_near_target(name):
    factory, size = MODELS[name]
    model = _randomize_bn(factory())
    compiled = ispc.compile(model, _data(size, batches=3, n=8), progress=False,
                            config=ispc.GatingConfig(keep_ratio=0.5))
    measured = compiled.measure(_data(size, batches=2, n=8, seed=1), progress=False)
    fractions = [v["kept_fraction"] for v in measured["layers"].values()]
    mean = sum(fractions) / len(fractions)
    assert 0.4 <= mean <= 0.6, fractions
    assert 0 < measured["mac_reduction"] < 1


def test_user_model_is_never_modified():
    model = _randomize_bn(M.resnet20(num_classes=10)).train()
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    ispc.compile(model, _data(32, batches=1), progress=False)
    ispc.inspect(model, _data(32, batches=1), progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.parameters())  # the compiled copy's are frozen
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_call_runs_as_under_no_grad():
    """The compiled model is frozen: ``fast(x)`` with grad mode on takes the fast path (the
    README's call), and an input that requires grad still gets its gradient."""
    model = _randomize_bn(M.resnet20(num_classes=10))
    fast = ispc.compile(model, _data(32, batches=1), progress=False,
                        config=ispc.GatingConfig(keep_ratio=0.5))
    assert not any(p.requires_grad for p in fast.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = fast(x)
    out = fast(x)
    assert not out.requires_grad and torch.equal(out, want)
    xg = x.clone().requires_grad_()
    out = fast(xg)
    assert rel_err(out.detach(), want) <= 1e-4
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    fast.graph_module.requires_grad_(True)  # the docstring's way back to gradients: seen per call
    out = fast(x)
    assert out.requires_grad and rel_err(out.detach(), want) <= 1e-4
    out.sum().backward()
    assert any(p.grad is not None for p in fast.parameters())


def test_train_mode_model_compiles_as_its_eval_self():
    model = _randomize_bn(M.resnet20(num_classes=10)).train()
    compiled = ispc.compile(model, _data(32, batches=1), progress=False,
                            config=ispc.GatingConfig(keep_ratio=1.0))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4


def test_any_batch_and_spatial_size():
    model = _randomize_bn(M.resnet20(num_classes=10))
    for mode in ("threshold", "topk"):
        compiled = ispc.compile(model, _data(32, batches=1), progress=False,
                                config=ispc.GatingConfig(keep_ratio=0.5, mode=mode))
        with torch.no_grad():
            for n, size in [(1, 32), (7, 32), (2, 48), (3, 20)]:
                out = compiled(torch.randn(n, 3, size, size))
                assert out.shape == (n, 10) and torch.isfinite(out).all()


def test_gated_graph_matches_masked_dense_reference():
    """Every gated layer in a compiled graph computes conv(x * m) for its input."""
    model = _randomize_bn(M.resnet20(num_classes=10))
    compiled = ispc.compile(model, _data(32), progress=False, config=ispc.GatingConfig(keep_ratio=0.4))
    gated = compiled.gated_modules()
    assert len(gated) > 10
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.append(rel_err(o, mod.reference(*a))))
             for m in gated.values()]
    with torch.no_grad():
        compiled(torch.randn(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(gated) and max(seen) <= 1e-5


def test_report_json_and_table_agree():
    model = _randomize_bn(M.resnet20(num_classes=10))
    rep = ispc.inspect(model, _data(32), progress=False)
    d = rep.to_dict()
    table = str(rep)
    for row in d["layers"]:
        assert row["name"] in table
        assert {"name", "gated", "cv", "macs"} <= row.keys()
    assert {"dense_macs", "expected_macs"} <= d["summary"].keys()
    assert d["summary"]["layers_gated"] == sum(r["gated"] for r in d["layers"])
    ranks = sorted(r["rank"] for r in d["layers"] if r["rank"] is not None)
    assert ranks == list(range(1, len(ranks) + 1))
    # rank follows CV
    by_rank = sorted((r for r in d["layers"] if r["rank"]), key=lambda r: r["rank"])
    assert all(a["cv"] >= b["cv"] for a, b in zip(by_rank, by_rank[1:]))
    # inspect does not gate: the model graph is unchanged but the report has the decision
    assert d["summary"]["calibrated"] is True


def test_layer_selection_by_cv():
    model = _randomize_bn(M.resnet20(num_classes=10))
    base = ispc.inspect(model, _data(32), progress=False)
    cvs = sorted(r.cv for r in base.layers if r.cv is not None)
    cut = cvs[len(cvs) // 2]
    rep = ispc.inspect(model, _data(32), progress=False, config=ispc.GatingConfig(min_cv=cut))
    for r in rep.layers:
        if r.cv is not None:
            assert r.gated == (r.cv >= cut)
            if not r.gated:
                assert "CV below cut-off" in r.reason
    rep = ispc.inspect(model, _data(32), progress=False, config=ispc.GatingConfig(gate_fraction=0.25))
    gated = [r for r in rep.layers if r.gated]
    assert len(gated) == -(-len(cvs) // 4)
    assert min(r.cv for r in gated) >= max(r.cv for r in rep.layers if r.cv is not None and not r.gated)


def test_compile_without_data():
    model = _randomize_bn(M.resnet20(num_classes=10))
    compiled = ispc.compile(model, config=ispc.GatingConfig(mode="topk", keep_ratio=0.5),
                            progress=False)
    assert compiled.report.summary["calibrated"] is False
    assert any("without calibration data" in n for n in compiled.report.notes)
    assert all(r.cv is None for r in compiled.report.layers)
    k = {r.name: r.k for r in compiled.report.gated_layers}
    assert k["layer1.0.conv1"] == 8
    with torch.no_grad():
        assert compiled(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ispc.ConfigError, match="calibration data"):
        ispc.compile(model)  # threshold mode needs data


def test_topk_channel_multiple():
    model = _randomize_bn(M.resnet20(num_classes=10))
    compiled = ispc.compile(model, _data(32, batches=1), progress=False,
                            config=ispc.GatingConfig(mode="topk", keep_ratio=0.3, channel_multiple=8))
    assert all(r.k % 8 == 0 for r in compiled.report.gated_layers)


@pytest.mark.parametrize("bad,err", [
    ("not a model", ispc.UnsupportedModelError),
])
def test_bad_model(bad, err):
    with pytest.raises(err):
        ispc.compile(bad, _data(32))


def test_bad_inputs_give_clear_errors():
    model = M.resnet20(num_classes=10).eval()
    with pytest.raises(ispc.DataError, match="no batches"):
        ispc.compile(model, [])
    with pytest.raises(ispc.DataError, match="channels"):
        ispc.compile(model, [torch.randn(2, 1, 32, 32)], progress=False)
    with pytest.raises(ispc.ConfigError):
        ispc.compile(model, _data(32), config={"keep_ratio": 0.5})
    with pytest.raises(ispc.BackendUnavailableError, match="available"):
        ispc.compile(model, _data(32), backend="tvm")
    with pytest.raises(ispc.TraceError, match="leaf_modules"):
        ispc.compile(zoo.Untraceable(), _data(32), progress=False)


def test_wrapped_models_are_unwrapped(monkeypatch):
    # no TF32 on a GPU: its rounding (3.5e-4 here on an H200) is not what this test is about
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _randomize_bn(M.resnet20(num_classes=10))
    wrapped = nn.DataParallel(model)
    compiled = ispc.compile(wrapped, _data(32, batches=1), progress=False,
                            config=ispc.GatingConfig(keep_ratio=1.0))
    # with one GPU, DataParallel moves the module to it: the input goes where the model is
    x = torch.randn(2, 3, 32, 32, device=next(model.parameters()).device)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4


def test_integer_parameters_are_refused():
    model = M.resnet20(num_classes=10).eval()
    model.fc.weight = nn.Parameter(model.fc.weight.data.to(torch.int32), requires_grad=False)
    with pytest.raises(ispc.UnsupportedModelError, match="floating-point"):
        ispc.compile(model, _data(32))


@pytest.mark.parametrize("call, message", [
    (lambda m: ispc.compile(m, None, keep_ratio=0.5),
     r"^ispc.compile\(\) has no option 'keep_ratio': it is a GatingConfig option; "
     r"pass config=ispc.GatingConfig\(keep_ratio=\.\.\.\)$"),
    (lambda m: ispc.compile(m, None, ispc.GatingConfig()),
     r"^ispc.compile\(\) takes 2 arguments by position \(model, calibration_data\), got 3; "),
    (lambda m: ispc.inspect(m, None, confg=None), r"^ispc.inspect\(\) has no option 'confg'; did you mean config="),
    (lambda m: ispc.static_prune(m, None, keep_fraction={}), r"did you mean keep_fractions="),
    (lambda m: ispc.tune(m, None, evaluate=len, max_drop=0.1, budget=3), r"did you mean time_budget_s="),
])
def test_entry_points_name_a_misplaced_or_misspelt_option(call, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ispc.OptionError, match=message):
        call(model)
