"""ispc.timing's pairing rule: the route's decision and the benchmark's reports divide round by
round with the same function."""
from __future__ import annotations

import pytest

from ispc.timing import paired, time_interleaved


def test_paired_ratios_round_by_round():
    p = paired([2.0, 3.0, 6.0], [4.0, 3.0, 3.0])
    assert p.ratios == (0.5, 1.0, 2.0)
    assert (p.median, p.faster_in, p.rounds, p.low, p.high) == (1.0, 1, 3, 0.5, 2.0)


@pytest.mark.parametrize("a, b", [([], []), ([1.0, 2.0], [1.0]), ([1.0], [0.0])])
def test_no_ratio_where_rounds_do_not_pair(a, b):
    p = paired(a, b)
    assert p.rounds == 0 and p.median is None and p.low is None and not p.beats(0.0)


def test_beats_needs_the_median_and_most_rounds():
    assert paired([9.0] * 5, [10.0] * 5).beats(0.05)  # 10% faster in every round
    assert not paired([9.0] * 5, [10.0] * 5).beats(0.2)  # not by 20%
    # 7.5% faster in the median ratio but in 2 of 4 rounds only
    assert not paired([8.0, 8.0, 10.5, 10.5], [10.0] * 4).beats(0.05)


def test_shuffled_rounds_vary_who_runs_before_whom_and_repeat_with_the_seed():
    def run(shuffle):
        calls: list[str] = []
        cands = {n: (lambda n=n: calls.append(n)) for n in "abcd"}
        out = time_interleaved(cands, warmup=0, rounds=12, progress=False, shuffle=shuffle)
        assert all(len(t.times_ms) == 12 for t in out.values())
        return calls

    def predecessors(calls):
        rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
        return {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in "abcd"}

    rotated, shuffled = run(None), run(0)
    assert all(len(p) == 1 for p in predecessors(rotated).values())  # always the same one
    assert all(len(p) >= 2 for p in predecessors(shuffled).values())
    assert run(0) == shuffled and run(1) != shuffled
