"""The standard model families of torchvision, timm and Hugging Face (tests/zoo.py: small faithful
definitions of their characteristic blocks; Hugging Face from small configs): every one compiles,
equals the original at keep 1.0, is gated at keep 0.5 with every gated layer equal to its
masked-dense reference, and its report names every convolution and linear layer
(benchmarks/coverage.py; docs/models.md has the table)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import zoo

_SPEC = importlib.util.spec_from_file_location(
    "ispc_benchmarks_coverage", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
coverage = sys.modules.setdefault(_SPEC.name, importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(coverage)

CALIBRATION = [zoo.example_input(8, 32, seed=2)]
HELD_OUT = zoo.example_input(4, 32, seed=3)
CONFIG = coverage.GatingConfig(min_channels=8)
#: families that must come out with linear layers over channels gated (ConvNeXt's pointwise
#: layers, the transformers' MLPs)
GATED_LINEARS = {"convnext", "convnext_tv", "swin", "maxvit", "vit"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("name", sorted(zoo.FAMILIES))
def test_family_compiles_equals_and_gates(name):
    row = coverage.check_model(name, zoo.FAMILIES[name](), CALIBRATION, HELD_OUT, config=CONFIG)
    assert row.compiles, row.refusal
    assert row.equal, row.equal_error
    assert row.layers_gated >= 2 and row.mac_reduction > 0.2, row
    assert row.reference_error is not None and row.reference_error <= 1e-5, row.reference_error
    assert not row.unnamed_layers, row.unnamed_layers


@pytest.mark.parametrize("name", sorted(GATED_LINEARS))
def test_linear_layers_over_channels_are_gated(name):
    import ispc

    c = ispc.compile(zoo.FAMILIES[name](), CALIBRATION, config=CONFIG.replace(keep_ratio=0.5),
                     progress=False)
    linears = [m for m in c.gated_modules().values() if isinstance(m, ispc.modules.GatedLinear)]
    assert len(linears) >= 2


def test_refusals_are_one_line_and_their_fix_works():
    """A model ispc cannot capture says so in one line, and the fix it names works."""
    import ispc

    model = zoo.Untraceable().eval()
    with pytest.raises(ispc.TraceError) as info:
        ispc.compile(model, CALIBRATION, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "Fix:" in msg and "torch.where" in msg

    class Fixed(zoo.DataDependentBlock):  # the fix the message names: torch.where, not if
        def forward(self, x):
            return torch.where(x.sum() > 0, self.conv(x), -x)

    fixed = zoo.Untraceable().eval()
    fixed.router = Fixed(16)
    fixed.router.load_state_dict(model.router.state_dict())
    row = coverage.check_model("untraceable, fixed", fixed, CALIBRATION, HELD_OUT, config=CONFIG)
    assert row.compiles and row.equal
