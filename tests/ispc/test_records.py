"""ispc.records: frozen records, replaced whole by the passes that revise them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ispc.records import GateDecision, KernelChoice, LayerFacts, NodeRecords


def test_records_are_frozen_and_replaced_whole():
    gate = GateDecision(gated=True, cv=0.5, rank=1, k=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gate.k = 5  # type: ignore[misc]
    counted = gate.with_kept(torch.tensor([2.0, 4.0, 6.0, 8.0]), threshold=0.25)
    assert (counted.kept_mean, counted.threshold, counted.k) == (5.0, 0.25, 4)
    assert counted.kept_p10 == pytest.approx(2.6) and counted.kept_p90 == pytest.approx(7.4)
    dense = counted.ungated("no measured gain")
    assert not dense.gated and dense.reason == "no measured gain"
    assert (dense.cv, dense.rank) == (0.5, 1)  # what rank found stays
    assert dense.threshold is dense.k is dense.kept_mean is None
    assert gate.k == 4 and counted.gated  # the originals are untouched


def test_layer_facts_and_kernel_labels():
    assert LayerFacts(name="a", op="conv2d", in_channels=3, out_channels=8).candidate
    assert not LayerFacts(name="a", op="conv2d", in_channels=3, out_channels=8,
                          reason="too few input channels").candidate
    assert KernelChoice(strategy="native", orient="cl").label == "native:cl"
    assert KernelChoice(strategy="gather").label == "gather"
    rec = NodeRecords(gate=GateDecision(gated=True))
    twin = rec.copy()
    twin.gate = twin.gate.ungated("x")
    assert rec.gate.gated and not twin.gate.gated
