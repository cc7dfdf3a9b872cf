"""ispc.pipeline: the named pipelines on a private copy, and what each entry point gets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from ispc import pipeline
from ispc.feature_decay import default_sites
from ispc.modules import GatedConv2d, StridedMaxPool2d
from zoo import SmallResidualNet


def _vgg_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_pipelines_are_named_once():
    assert pipeline.COMPILE[:len(pipeline.ANALYSIS)] == pipeline.ANALYSIS
    assert pipeline.COMPILE.index("refine") < pipeline.COMPILE.index("select_kernels")
    assert pipeline.COMPILE[-3:] == ("fuse_epilogues", "hand_sums", "dense_route")
    assert pipeline.RELOAD == ("lower_pools", "fuse_epilogues", "hand_sums")
    assert set(pipeline.PIPELINES) == {"compile", "inspect", "dense", "sites", "reload"}
    from ispc.passes import PASSES

    assert all(name in PASSES for names in pipeline.PIPELINES.values() for name in names)


def test_run_works_on_a_private_copy():
    model = _vgg_like().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, state = pipeline.run(model, [torch.randn(4, 3, 8, 8)], pipeline="compile",
                             config=ispc.GatingConfig(mode="topk"), progress=False)
    assert any(isinstance(m, GatedConv2d) for m in gm.modules())
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert state.calibrated and state.example_inputs[0].shape == (4, 3, 8, 8)
    report = pipeline.build_report(gm, state)
    assert report.summary["layers_gated"] == 1 and report.layer("4").cpu_kernel


def test_dense_graph_gets_the_compiled_models_lowerings():
    model = _vgg_like()
    x = torch.randn(2, 3, 8, 8)
    gm = pipeline.dense_graph(model, x)
    assert not any(isinstance(m, (nn.BatchNorm2d, GatedConv2d)) for m in gm.modules())
    assert any(type(m) is StridedMaxPool2d for m in gm.modules())
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_sites_are_what_compile_considers():
    model = SmallResidualNet()
    assert pipeline.site_names(model) == default_sites(model) == ["body.0", "down"]
    c = ispc.compile(model, [torch.randn(8, 3, 16, 16)], progress=False)
    considered = {r.name for r in c.report.layers if r.cv is not None}
    assert considered == {"body.0", "down"}


def test_the_entry_points_refuse_what_is_not_a_model_or_config():
    with pytest.raises(ispc.UnsupportedModelError):
        pipeline.run("model")
    with pytest.raises(ispc.ConfigError, match="GatingConfig"):
        pipeline.run(_vgg_like(), config={"keep_ratio": 0.5})
    with pytest.raises(KeyError):
        pipeline.run(_vgg_like(), pipeline="nosuch")


def test_a_model_without_layers_says_so():
    """0 layers is never silent: the report says nothing was found to gate and what to try."""
    c = ispc.compile(nn.Sequential(nn.ReLU(), nn.Flatten()), [torch.randn(2, 3, 8, 8)],
                     progress=False)
    assert c.report.summary["layers_total"] == 0
    assert any("no convolution or linear layer" in n and "capture='export'" in n
               for n in c.report.notes)
