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
    assert cfg.route_spinning is True
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
    dict(route_spinning="yes"),
])
def test_invalid_values_raise_config_error(bad):
    with pytest.raises(ispc.ConfigError) as info:
        GatingConfig(**bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ispc.IspcError)
    assert next(iter(bad)) in str(info.value)


def test_replace_validates_and_rejects_unknown():
    cfg = GatingConfig().replace(keep_ratio=0.25, mode="topk")
    assert cfg.keep_ratio == 0.25 and cfg.mode == "topk"
    with pytest.raises(ispc.OptionError, match="keep_ration.*did you mean keep_ratio="):
        GatingConfig().replace(keep_ration=0.3)
    with pytest.raises(ispc.ConfigError):
        GatingConfig().replace(keep_ratio=2.0)


def test_to_dict_is_json_friendly():
    import json

    from torch import nn
    d = GatingConfig(leaf_modules=(nn.LSTM,), include=("a.*",)).to_dict()
    assert d["leaf_modules"] == ["torch.nn.modules.rnn.LSTM"]
    json.dumps(d)


def test_layer_keep_ratios_frozen_hashable_and_last_match_wins():
    cfg = GatingConfig(layer_keep_ratios={"layer3.*": 0.4, "layer3.2.conv2": 1})
    assert cfg.layer_keep_ratios == (("layer3.*", 0.4), ("layer3.2.conv2", 1.0))
    assert hash(cfg) == hash(GatingConfig(layer_keep_ratios=[("layer3.*", 0.4), ("layer3.2.conv2", 1.0)]))
    assert cfg.layer_keep_ratio("layer3.0.conv1") == 0.4
    assert cfg.layer_keep_ratio("layer3.2.conv2") == 1.0  # the later, more specific pattern
    assert cfg.layer_keep_ratio("layer1.0.conv1") is None
    assert cfg.to_dict()["layer_keep_ratios"] == {"layer3.*": 0.4, "layer3.2.conv2": 1.0}
    assert not cfg.replace(keep_ratio=1.0).keeps_everything
    assert GatingConfig(keep_ratio=1.0, layer_keep_ratios={"a": 1.0}).keeps_everything


@pytest.mark.parametrize("bad,msg", [
    ({"a": 0.0}, "not a keep ratio in \\(0, 1\\]"), ({"a": 1.5}, "not a keep ratio"),
    ({"a": True}, "not a keep ratio"), ({"a": math.nan}, "not a keep ratio"),
    ({"": 0.5}, "non-empty"), ({3: 0.5}, "non-empty"), ("layer1.*", "must map layer-name patterns"),
    ([("a", 0.5), ("a", 0.4)], "twice"), ([("a", 0.5, 1)], "must map"),
])
def test_layer_keep_ratios_invalid(bad, msg):
    with pytest.raises(ispc.ConfigError, match=msg) as info:
        GatingConfig(layer_keep_ratios=bad)
    assert "layer_keep_ratios" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("call, message", [
    (lambda: GatingConfig(keep_ratoi=0.5), r"^GatingConfig has no option 'keep_ratoi'; did you mean keep_ratio=\.\.\.\?$"),
    (lambda: GatingConfig(xyz=1), r"^GatingConfig has no option 'xyz'; its options: keep_ratio, mode, "),
    (lambda: GatingConfig(0.5), r"^GatingConfig takes keyword options only, e.g. GatingConfig\(keep_ratio=0.5\)"),
])
def test_unknown_or_positional_options_are_one_line_option_errors(call, message):
    with pytest.raises(ispc.OptionError, match=message) as info:
        call()
    # a TypeError as Python's own, and a ConfigError / IspcError as every config mistake
    assert isinstance(info.value, TypeError) and isinstance(info.value, ispc.ConfigError)
    assert "\n" not in str(info.value)


def test_checked_init_keeps_signature_copy_and_pickle():
    import copy
    import inspect
    import pickle
    assert list(inspect.signature(GatingConfig).parameters)[:2] == ["keep_ratio", "mode"]
    cfg = GatingConfig(keep_ratio=0.3, mode="topk")
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg)
