"""fold_bn: conv -> BN pairs fold into one conv with the same output."""
from __future__ import annotations

import torch
from torch import nn

from conftest import rel_err
from ispc.config import GatingConfig
from ispc.passes import PassState, capture, fold_batchnorm


def _randomize_bn(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_folds_and_preserves_output():
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 10, 10)
    state = PassState(config=GatingConfig(), example_inputs=(x,))
    gm = fold_batchnorm(capture(m, state), state)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    assert rel_err(gm(x), m(x)) < 1e-5


def test_bn_after_shared_output_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output used twice: folding would change the add

    m = _randomize_bn(Net())
    x = torch.randn(1, 3, 5, 5)
    state = PassState(config=GatingConfig(), example_inputs=(x,))
    gm = fold_batchnorm(capture(m, state), state)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    assert rel_err(gm(x), m(x)) < 1e-6
