"""GatingConfig: frozen, keyword-only, every field validated with a clear ConfigError."""
from __future__ import annotations

import dataclasses
import math

import pytest

import ispc
from ispc.config import GatingConfig


def test_defaults_and_frozen():
    cfg = GatingConfig()
    assert cfg.keep_ratio == 0.5 and cfg.mode == "threshold" and cfg.saliency == "l2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keep_ratio = 0.3  # type: ignore[misc]
    with pytest.raises(TypeError):
        GatingConfig(0.5)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize("bad", [
    dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(keep_ratio=-0.1), dict(keep_ratio=math.nan),
    dict(keep_ratio="0.5"), dict(keep_ratio=True), dict(mode="dynamic"), dict(saliency="l3"),
    dict(allocation="per-layer"),
    dict(min_cv=-1.0), dict(gate_fraction=1.1), dict(min_channels=0), dict(min_channels=2.5),
    dict(channel_multiple=0), dict(include="layer1.*"), dict(exclude=["a"]),
    dict(max_calibration_samples=0), dict(calibration_rounds=-1), dict(leaf_modules=(1,)),
])
def test_invalid_values_raise_config_error(bad):
    with pytest.raises(ispc.ConfigError) as info:
        GatingConfig(**bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ispc.IspcError)
    assert next(iter(bad)) in str(info.value)


def test_replace_validates_and_rejects_unknown():
    cfg = GatingConfig().replace(keep_ratio=0.25, mode="topk")
    assert cfg.keep_ratio == 0.25 and cfg.mode == "topk"
    with pytest.raises(ispc.ConfigError, match="keep_ration"):
        GatingConfig().replace(keep_ration=0.3)
    with pytest.raises(ispc.ConfigError):
        GatingConfig().replace(keep_ratio=2.0)


def test_to_dict_is_json_friendly():
    import json

    from torch import nn
    d = GatingConfig(leaf_modules=(nn.LSTM,), include=("a.*",)).to_dict()
    assert d["leaf_modules"] == ["torch.nn.modules.rnn.LSTM"]
    json.dumps(d)
