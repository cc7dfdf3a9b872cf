"""Calibration data normalisation: what users pass becomes checked input tensors or a DataError."""
from __future__ import annotations

import pytest
import torch

import ispc
from ispc.data import iter_inputs


def test_accepts_tensors_tuples_generators_and_one_big_tensor():
    xs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    assert len(list(iter_inputs(xs))) == 3
    assert len(list(iter_inputs([(x, torch.zeros(2)) for x in xs]))) == 3
    assert len(list(iter_inputs(x for x in xs))) == 3
    assert sum(t.shape[0] for t in iter_inputs(torch.randn(130, 3, 4, 4))) == 130


@pytest.mark.parametrize("bad,match", [
    ([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], "dtype"),
    ([torch.tensor([[float("nan")]])], "NaN"),
    ([torch.zeros(0, 3, 4, 4)], "empty"),
    (["not a tensor"], "str"),
    ([{"a": torch.zeros(1, 3, 4, 4), "b": torch.zeros(1, 3, 4, 4)}], "mapping"),
    ([{"pixel_values": torch.zeros(1, 3, 4, 4)}, {"x": torch.zeros(1, 3, 4, 4)}], "no tensor"),
    ([torch.zeros(1, 3, 4, 4), {"x": torch.zeros(1, 3, 4, 4)}], "one kind"),
    ({"pixel_values": torch.zeros(1, 3, 4, 4)}, "wrap it in a list"),
    (42, "iterable"),
])
def test_bad_data_raises_data_error(bad, match):
    with pytest.raises(ispc.DataError, match=match):
        list(iter_inputs(bad))


def test_mapping_batches_name_their_input():
    """Hugging Face batches (dicts, BatchFeature): the input tensor, and the keyword it goes by."""
    x = torch.randn(2, 3, 4, 4)
    stream = iter_inputs([{"pixel_values": x, "labels": torch.zeros(2)}] * 2)
    got = list(stream)
    assert len(got) == 2 and got[0] is x and stream.key == "pixel_values"
    stream = iter_inputs([{"image": x, "label": torch.zeros(2)}])
    assert next(stream) is x and stream.key == "image"
    stream = iter_inputs([x])
    next(stream)
    assert stream.key is None
    transformers = pytest.importorskip("transformers")
    stream = iter_inputs([transformers.BatchFeature({"pixel_values": x, "labels": torch.zeros(2)})])
    assert next(stream) is x and stream.key == "pixel_values"
