"""ispc.tune: the budget holds, the time budget stops it, a seed fixes it, the result reproduces
through compile and save/load, static search, the cache, and one-line errors for bad arguments."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch import nn

import ispc
from ispc.baselines import StaticPrunedModel

tune_module = importlib.import_module("ispc.tune")


class Toy(nn.Module):
    """Four gateable convolutions (one a residual block), small enough for a search in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10, bias=False)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = self.c(self.down(x))
        return self.fc(x.mean((2, 3)))


def _toy() -> nn.Module:
    torch.manual_seed(0)
    m = Toy()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        m.fc.weight.mul_(4.0)  # predictions that depend on the features, not on one class
    return m.eval()


@pytest.fixture(scope="module")
def setup():
    model = _toy()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 3, 8, 8, generator=g) for _ in range(2)]
    xv = torch.randn(200, 3, 8, 8, generator=g)
    with torch.no_grad():
        yv = model(xv).argmax(1)  # labels: the dense model's own predictions (dense top-1 = 100)
    val = [(xv[i:i + 100], yv[i:i + 100]) for i in (0, 100)]
    return model, calib, val


def _tune(setup, **kw):
    model, calib, val = setup
    kw = {"evaluate": ispc.tune.top1(val), "max_drop": 10.0, "target": "macs", "progress": False,
          **kw}
    return ispc.tune(model, calib, **kw)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_the_budget_holds_and_something_is_cut(setup, mode):
    model, calib, val = setup
    fast = _tune(setup, config=ispc.GatingConfig(mode=mode))
    rep = fast.tuning
    assert rep.dense_metric == 100.0 and rep.floor == 90.0
    # the returned model's metric is the one reported, and within the budget
    assert ispc.tune.top1(val)(fast) == pytest.approx(rep.best.metric)
    assert rep.best.metric >= rep.floor and rep.best.feasible
    assert rep.best.mac_reduction > 0.05 and len(fast.gated_modules()) > 0
    # every feasible configuration tried cuts no more than the chosen one (target="macs")
    assert all(t.mac_reduction <= rep.best.mac_reduction + 1e-12 for t in rep.trials if t.feasible)
    # the search rolled something back: some configuration tried broke the budget
    assert any(t.feasible is False for t in rep.trials)
    assert rep.evaluations == len([t for t in rep.trials if not t.cached])
    assert "chosen" in rep.to_table() and json.loads(rep.to_json())["best"]["index"] == rep.chosen
    assert fast.config.mode == mode and fast.config.keep_ratio == 1.0


def test_the_budget_holds_relative(setup):
    fast = _tune(setup, max_drop=0.05, relative=True)
    assert fast.tuning.floor == pytest.approx(95.0)
    assert fast.tuning.best.metric >= 95.0


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_the_result_reproduces_through_compile_and_save_load(setup, mode, tmp_path):
    model, calib, _ = setup
    fast = _tune(setup, config=ispc.GatingConfig(mode=mode))
    ratios = dict(fast.config.layer_keep_ratios)
    assert set(ratios) == {"a.0", "b", "down.0", "c.0"} and min(ratios.values()) < 1.0
    again = ispc.compile(model, calib, config=fast.config, progress=False)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(again(x), fast(x), rtol=1e-5, atol=1e-5)
    assert again.report.summary["mac_reduction"] == pytest.approx(fast.report.summary["mac_reduction"])
    for row in fast.report.layers:
        other = again.report.layer(row.name)
        # thresholds to rounding: calibration sums in float32 on another kernel path may differ
        # by an ulp (AVX2 Zen 3)
        assert (other.gated, other.k) == (row.gated, row.k)
        assert other.threshold == (None if row.threshold is None
                                   else pytest.approx(row.threshold, rel=1e-6))
    path = ispc.save(fast, tmp_path / "tuned.ispc")
    loaded = ispc.load(path)
    assert loaded.config == fast.config and loaded.config.layer_keep_ratios == fast.config.layer_keep_ratios
    with torch.no_grad():
        assert torch.allclose(loaded(x), fast(x), rtol=1e-5, atol=1e-5)


def test_per_sample_scores_keep_a_margin_for_the_noise(setup):
    """With per-sample scores a candidate must clear the floor by z * (paired standard error), so
    the chosen model's drop is within budget at the asked confidence; 0.5 is the point estimate."""
    model, calib, val = setup
    per_sample = ispc.tune.top1(val, per_sample=True)
    fast = _tune(setup, evaluate=per_sample, confidence=0.9, max_evaluations=12)
    rep = fast.tuning
    assert rep.confidence == 0.9 and rep.best.feasible
    dense, got = per_sample(model), per_sample(fast)
    assert got.shape == (200,) and float(got.mean()) == pytest.approx(rep.best.metric)
    se = float((dense - got).std() / 200 ** 0.5)
    z = 1.2815515655446004  # the normal's 0.9 quantile
    assert rep.best.margin == pytest.approx(z * se) and rep.best.margin > 0
    assert rep.best.metric - rep.best.margin >= rep.floor
    for t in rep.trials[1:]:  # feasibility is decided by the metric less its margin
        assert t.feasible == (t.metric - t.margin >= rep.floor - 1e-12)
    # some candidate's point estimate was within the budget but its bound was not
    assert any(t.metric >= rep.floor and not t.feasible for t in rep.trials)
    point = _tune(setup, evaluate=per_sample, confidence=0.5, max_evaluations=12).tuning
    assert all(t.margin == 0 for t in point.trials) and point.confidence == 0.5
    assert point.best.mac_reduction >= rep.best.mac_reduction
    with pytest.raises(ispc.DataError, match="same samples in the same order"):
        calls = iter(range(100))
        _tune(setup, evaluate=lambda m: torch.ones(10 + next(calls)), max_evaluations=3)


def _mac_metric(m):
    """A synthetic metric: 100 less the MACs cut in percent (the model as given scores 100), so
    the budget is a MAC cut the search must approach from below."""
    return 100.0 - (100.0 * m.report.summary["mac_reduction"] if hasattr(m, "report") else 0.0)


@pytest.mark.parametrize("max_drop", [20.0, 30.0, 40.0])
def test_half_steps_after_a_narrow_miss(setup, max_drop):
    """The path and the grid steps use GRID's ratios; a refinement step that misses the budget by
    less than NARROW of it is retried in half steps (between two grid points), one that misses by
    more freezes its layer; the budget holds throughout."""
    rep = _tune(setup, evaluate=_mac_metric, max_drop=max_drop).tuning
    grid = set(tune_module.GRID)
    assert rep.best.feasible and 100 * rep.best.mac_reduction <= max_drop + 1e-9
    for t in rep.trials:
        assert t.feasible == (t.metric >= rep.floor - 1e-12)
        if t.phase == "path":
            assert set(t.ratios.values()) <= grid
    narrow = tune_module.NARROW * max_drop
    halved = []
    for t in rep.trials:
        if t.phase != "greedy" or "(rolled back" not in t.note:
            continue
        step = float(t.note.split()[1].split("->")[1])
        if t.note.endswith("(rolled back; half steps next)"):
            assert rep.floor - t.metric < narrow and step in grid
            halved.append(t.index)
        elif step in grid:  # a grid step that missed by more: its layer frozen at once
            assert rep.floor - t.metric >= narrow
    assert halved, "no narrow miss on this toy: change max_drop"
    # half steps were tried after the first narrow miss
    assert any(set(t.ratios.values()) - grid for t in rep.trials[min(halved):])


def test_layers_grid_and_half_steps(setup, monkeypatch):
    """Each layer's ratios: the distinct GRID settings, with a half step between two of them only
    where it gives a setting of its own; sensitivity is measured at grid points only."""
    model, calib, val = setup
    calls = []
    real = tune_module._Search.proxy

    def counted(self):
        calls.append(1)
        return real(self)

    for mode in ("threshold", "topk"):
        search = tune_module._Search(
            model, calib, ispc.tune.top1(val), base=ispc.GatingConfig(mode=mode), max_drop=1.0,
            relative=False, target="macs", static=False, seed=0, progress=False,
            time_budget_s=None, max_evaluations=None, cache=None, confidence=0.9)
        search.build()
        search.load_cache()
        for lay in search.layers.values():
            assert lay.coarse[0] and lay.ratios[0] == 1.0 and len(lay.coarse) == len(lay.ratios)
            assert all(a > b for a, b in zip(lay.ratios, lay.ratios[1:]))
            assert len(set(lay.settings)) == len(lay.settings)
            for i, on in enumerate(lay.coarse):
                if not on:  # between two grid points
                    assert lay.coarse[i - 1] and lay.coarse[i + 1]
            if mode == "threshold":
                assert {r for r, on in zip(lay.ratios, lay.coarse) if on} <= set(tune_module.GRID)
        assert any(not on for lay in search.layers.values() for on in lay.coarse)
        calls.clear()
        with monkeypatch.context() as mp:
            mp.setattr(tune_module._Search, "proxy", counted)
            search.sensitivity()
        measured = sum(sum(lay.coarse) - 1 for lay in search.layers.values())
        assert 0 < len(calls) <= measured
        for lay in search.layers.values():
            for i, on in enumerate(lay.coarse):
                if not on:
                    assert lay.proxy[i] == pytest.approx((lay.proxy[i - 1] + lay.proxy[i + 1]) / 2) \
                        or not math.isfinite(lay.proxy[i + 1])


def test_deterministic_for_a_seed(setup):
    runs = [_tune(setup, seed=3).tuning for _ in range(2)]
    assert [(t.ratios, t.metric, t.mac_reduction) for t in runs[0].trials] == \
           [(t.ratios, t.metric, t.mac_reduction) for t in runs[1].trials]
    assert runs[0].config == runs[1].config


def test_stops_within_its_time_budget(setup, monkeypatch):
    """Each metric evaluation takes 10 s of a fake clock: a 45 s budget leaves room for the dense
    model's and at most three more, and what comes back is the best feasible model so far."""
    model, calib, val = setup
    now = [0.0]
    monkeypatch.setattr(tune_module, "clock", lambda: now[0])
    metric = ispc.tune.top1(val)

    def slow(m):
        now[0] += 10.0
        return metric(m)

    fast = _tune(setup, evaluate=slow, time_budget_s=45)
    rep = fast.tuning
    assert rep.stopped is not None and "time budget" in rep.stopped
    assert now[0] <= 45.0 and rep.evaluations <= 4
    assert rep.best.feasible and metric(fast) >= rep.floor
    assert "best found so far" in rep.why


def test_max_evaluations(setup):
    rep = _tune(setup, max_evaluations=3).tuning
    assert rep.evaluations == 3 and rep.stopped == "max_evaluations reached"


def test_static_search(setup):
    model, calib, val = setup
    fast = _tune(setup, static=True)
    rep = fast.tuning
    assert isinstance(fast, StaticPrunedModel) and rep.mode == "static"
    assert rep.best.metric >= rep.floor and ispc.tune.top1(val)(fast) == pytest.approx(rep.best.metric)
    assert rep.keep_fractions and rep.best.mac_reduction > 0
    again = ispc.static_prune(model, calib, keep_fractions=rep.keep_fractions, progress=False)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(again(x), fast(x), rtol=1e-5, atol=1e-5)


def test_cache_replays_and_refuses_another_model(setup, tmp_path):
    model, calib, val = setup
    cache = tmp_path / "search.json"
    first = _tune(setup, cache=cache)
    calls = []
    metric = ispc.tune.top1(val)
    second = _tune(setup, cache=cache, evaluate=lambda m: calls.append(1) or metric(m))
    assert calls == [] and second.tuning.evaluations == 0
    assert second.config == first.config
    assert all(t.cached for t in second.tuning.trials)
    other = _toy()
    with torch.no_grad():
        other.fc.weight.add_(0.1)
    with pytest.raises(ispc.ConfigError, match="another model"):
        ispc.tune(other, calib, evaluate=metric, max_drop=1.0, cache=cache, progress=False)


def test_latency_target_runs(setup):
    fast = _tune(setup, target="latency", max_evaluations=4)
    rep = fast.tuning
    assert rep.target == "latency" and fast.config.latency_aware
    assert all(t.latency_ms > 0 and t.dense_latency_ms > 0 for t in rep.trials)
    assert rep.best.feasible and "measured latency" in rep.why


def test_top1_helper():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(10, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    assert ispc.tune.top1([(x[:5], y[:5]), (x[5:], y[5:])])(model) == pytest.approx(70.0)
    scores = ispc.tune.top1([(x[:5], y[:5]), (x[5:], y[5:])], per_sample=True)(model)
    assert scores.tolist() == [0.0] * 3 + [100.0] * 7
    with pytest.raises(ispc.DataError, match="re-iterable"):
        ispc.tune.top1(iter([(x, y)]))
    with pytest.raises(ispc.DataError, match="not \\(inputs, labels\\)"):
        ispc.tune.top1([x])(model)


@pytest.mark.parametrize("kw,msg", [
    ({"evaluate": 3}, "evaluate must be a callable"),
    ({"max_drop": -1}, "max_drop must be a number >= 0"),
    ({"max_drop": float("nan")}, "max_drop must be a number >= 0"),
    ({"max_drop": 2, "relative": True}, "relative=True"),
    ({"target": "flops"}, "target='flops' is not one of"),
    ({"time_budget_s": 0}, "time_budget_s must be a positive"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"max_evaluations": 0}, "max_evaluations must be a positive"),
    ({"config": ispc.GatingConfig(layer_keep_ratios={"a.0": 0.5})}, "chooses layer_keep_ratios"),
    ({"config": {"keep_ratio": 0.5}}, "config must be an ispc.GatingConfig"),
    ({"calibration_data": None}, "needs calibration_data"),
    ({"calibration_data": []}, "calibration_data is empty"),
    ({"evaluate": lambda m: "good"}, "evaluate\\(model\\) returned 'good'"),
    ({"confidence": 1.0}, "confidence must be a probability in \\[0.5, 1\\)"),
])
def test_bad_arguments_are_one_line_errors(setup, kw, msg):
    model, calib, val = setup
    args = {"calibration_data": calib, "evaluate": ispc.tune.top1(val), "max_drop": 1.0,
            "progress": False, **kw}
    data = args.pop("calibration_data")
    with pytest.raises(ispc.IspcError, match=msg) as info:
        ispc.tune(model, data, **args)
    assert "\n" not in str(info.value)
