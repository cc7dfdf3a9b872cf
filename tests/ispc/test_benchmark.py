"""The benchmark harness: interleaved timing, and the allocator setting recorded with results."""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import ispc
from ispc.benchmark import benchmark, retain_freed_memory, time_interleaved


def test_time_interleaved_runs_every_candidate_each_round():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    t = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, warmup=2, rounds=5,
                         progress=False)
    assert calls == {"a": 7, "b": 7}
    assert all(len(v.times_ms) == 5 and v.p25 <= v.median <= v.p75 for v in t.values())


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
