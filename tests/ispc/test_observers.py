"""SaliencyStats: exact mergeable moments and CV."""
from __future__ import annotations

import torch

from ispc.observers import SaliencyStats


def test_moments_exact_and_mergeable_in_any_order():
    rows = torch.rand(100, 7) * torch.arange(1, 8)
    whole = SaliencyStats(7)
    whole.update(rows)
    parts = [SaliencyStats(7) for _ in range(3)]
    parts[0].update(rows[:10])
    parts[1].update(rows[10:55])
    parts[2].update(rows[55:])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert merged.count == 100
    assert torch.allclose(merged.mean, rows.double().mean(0))
    assert torch.allclose(merged.std, rows.double().std(0))
    assert torch.allclose(whole.std, rows.double().std(0))


def test_cv_and_dead_channels():
    rows = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    st = SaliencyStats(3)
    st.update(rows)
    cv = st.channel_cv()
    assert cv[1] == 0 and cv[2] == 0
    assert abs(float(cv[0]) - (rows[:, 0].std() / rows[:, 0].mean()).item()) < 1e-6
    assert abs(st.layer_cv() - float(cv[[0, 2]].mean())) < 1e-9


def test_sample_is_bounded_and_state_dict_round_trips():
    st = SaliencyStats(4, max_rows=30)
    for _ in range(5):
        st.update(torch.rand(8, 4))
    assert st.sample.shape == (30, 4) and st.count == 40
    back = SaliencyStats.from_state_dict(st.state_dict())
    assert back.count == 40 and torch.equal(back.sample, st.sample)
    assert torch.allclose(back.mean, st.mean)
