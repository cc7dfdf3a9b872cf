"""The benchmark harness: interleaved timing, and the allocator setting recorded with results."""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import ispc
from ispc.benchmark import (MAX_INPUT_BATCHES, benchmark, input_batches, retain_freed_memory,
                            time_interleaved)


def test_time_interleaved_runs_every_candidate_each_round():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    t = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, warmup=2, rounds=5,
                         progress=False)
    assert calls == {"a": 7, "b": 7}
    assert all(len(v.times_ms) == 5 and v.p25 <= v.median <= v.p75 for v in t.values())


def test_time_interleaved_stops_timing_clear_losers(monkeypatch):
    """prune_ratio: after min_samples rounds a candidate whose fastest call is slower than
    prune_ratio x the leader's median is no longer called; ``keep`` ones always are."""
    import ispc.timing as timing

    clock = [0.0]
    cost = {"fast": 1.0, "close": 1.2, "slow": 2.0, "kept": 3.0}
    calls = dict.fromkeys(cost, 0)

    def call(k):
        calls[k] += 1
        clock[0] += cost[k]

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock[0]

    monkeypatch.setattr(timing, "time", FakeTime)
    t = timing.time_interleaved({k: (lambda k=k: call(k)) for k in cost}, warmup=1, rounds=6,
                                progress=False, prune_ratio=1.3, keep=("kept",))
    assert calls == {"fast": 7, "close": 7, "slow": 3, "kept": 7}
    assert len(t["slow"].times_ms) == 2 and t["slow"].median == pytest.approx(2000.0)
    assert t["fast"].median == pytest.approx(1000.0)
    t = timing.time_interleaved({k: (lambda k=k: call(k)) for k in cost}, warmup=0, rounds=3,
                                progress=False)
    assert all(len(v.times_ms) == 3 for v in t.values())  # no prune_ratio: every call timed
    # budget_s: past min_rounds, stop once the timed calls took that long (7.2 s a round here)
    t = timing.time_interleaved({k: (lambda k=k: call(k)) for k in cost}, warmup=0, rounds=30,
                                progress=False, budget_s=30.0, min_rounds=3)
    assert all(len(v.times_ms) == 5 for v in t.values())
    t = timing.time_interleaved({k: (lambda k=k: call(k)) for k in cost}, warmup=0, rounds=30,
                                progress=False, budget_s=1.0, min_rounds=3)
    assert all(len(v.times_ms) == 3 for v in t.values())


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt is Linux-only here")
def test_retain_freed_memory_is_idempotent_and_says_what_it_did():
    first, second = retain_freed_memory(), retain_freed_memory()
    assert first == second and first.startswith("glibc")


def test_benchmark_records_the_allocator_setting():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    data = [torch.randn(4, 3, 12, 12)]
    compiled = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk"),
                            progress=False)
    kept = benchmark(model, compiled, (3, 12, 12), rounds=2, warmup=1, progress=False,
                     retain_memory=False)
    assert kept[0].allocator == "as configured by the process"
    assert kept[0].to_dict()["allocator"] == kept[0].allocator
    assert kept[0].theoretical_speedup > 1.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_dense_baseline_runs_the_compiled_models_layout(channels_last):
    """Layout is a lowering, not gating: the dense baseline gets the compiled model's (as it gets
    its pools), so the ratios measure gating alone."""
    from ispc.benchmark import dense_baseline, results_table
    from ispc.passes.channels_last import runs_channels_last

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    compiled = ispc.compile(model, [torch.randn(4, 3, 12, 12)], progress=False,
                            config=ispc.GatingConfig(mode="topk", min_channels=8,
                                                     channels_last=channels_last))
    result = benchmark(model, compiled, (3, 12, 12), rounds=2, warmup=1, progress=False)[0]
    assert result.layout == ("NHWC" if channels_last else "NCHW")
    assert ("(NHWC)" in results_table([result])) == channels_last
    x = torch.randn(2, 3, 12, 12)
    dense = dense_baseline(model, x[:1], channels_last=channels_last)
    assert runs_channels_last(dense) == channels_last
    with torch.no_grad():
        out = dense(x)
        assert out.is_contiguous() and torch.allclose(out, model(x), atol=1e-5)


def test_input_batches_cut_every_example_once_wrapping_around():
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = input_batches(4, inputs=x)
    assert len(batches) == 3 and all(b.shape == (4, 1, 2, 2) for b in batches)
    firsts = torch.cat([b[:, 0, 0, 0] for b in batches]).tolist()
    assert firsts == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert len(input_batches(1, inputs=x.repeat(10, 1, 1, 1))) == MAX_INPUT_BATCHES


def test_input_batches_without_examples_are_distinct_random_batches():
    pool = input_batches(2, input_shape=(3, 4, 4), pool=3)
    assert len(pool) == 3 and all(p.shape == (2, 3, 4, 4) for p in pool)
    assert not torch.equal(pool[0], pool[1]) and not torch.equal(pool[1], pool[2])


@pytest.mark.parametrize("kwargs, words", [
    ({"input_shape": None}, "input shape"),
    ({"inputs": torch.randn(4, 3, 8, 8), "input_shape": (3, 9, 9)}, "(3, 9, 9)"),
    ({"inputs": torch.randn(0, 3, 8, 8)}, "M >= 1"),
    ({"input_shape": (3, 8, 8), "pool": 0}, "input_pool"),
])
def test_input_batches_refuse_what_they_cannot_time(kwargs, words):
    with pytest.raises(ispc.DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        input_batches(1, **kwargs)


def test_benchmark_times_and_counts_macs_on_the_given_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    compiled = ispc.compile(model, [torch.randn(8, 3, 10, 10)],
                            config=ispc.GatingConfig(keep_ratio=0.5, mode="threshold"),
                            progress=False)
    # examples whose sparsity differs from random inputs': half of them all zeros (every
    # channel below threshold), the rest random
    x = torch.randn(6, 3, 10, 10)
    x[::2] = 0
    seen = []
    gated = next(m for m in compiled.modules() if isinstance(m, ispc.modules.GatedConv2d))
    hook = gated.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        res = benchmark(model, compiled, batch_sizes=(1, 4), inputs=x, rounds=3, warmup=1,
                        progress=False, retain_memory=False)
    finally:
        hook.remove()
    assert "6 given examples" in res[0].inputs and res[0].inputs.startswith("6 distinct")
    assert res[1].inputs.startswith("2 distinct")
    # the gated layer saw several different inputs, each one of the examples' activations
    assert len({t.sum().item() for t in seen}) > 2
    for b, r in zip((1, 4), res):
        want = compiled.measure(input_batches(b, inputs=x), progress=False)
        assert r.mac_reduction == pytest.approx(want["mac_reduction"])
    random_input = benchmark(model, compiled, (3, 10, 10), rounds=2, warmup=1, progress=False,
                             retain_memory=False)[0]
    assert random_input.mac_reduction != pytest.approx(res[0].mac_reduction)
