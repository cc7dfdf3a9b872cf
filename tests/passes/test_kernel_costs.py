"""kernel_costs: the shape-based cost model's predictions and the kernels measured selection
times (the selection itself: test_select_kernels.py)."""
from __future__ import annotations

import torch

from ispc.modules import GatedConv2d
from ispc.ops import native
from ispc.passes.kernel_costs import LARGE_LAYER_MACS, candidates, predicted_strategy


def test_largest_layers_are_predicted_to_oneDNN_on_gathered_channels():
    mod = GatedConv2d(torch.randn(128, 128, 3, 3), None, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=64)
    big, small = 112 * 112, 28 * 28
    assert 128 * 128 * 9 * big >= LARGE_LAYER_MACS > 128 * 128 * 9 * small
    assert predicted_strategy(mod, big) == ("gather", None)
    if native.available():
        assert predicted_strategy(mod, small) == ("native", native.ORIENT_CL)
        assert predicted_strategy(mod, 7 * 7) == ("native", native.ORIENT_CL)
        one = GatedConv2d(torch.randn(128, 128, 1, 1), None, stride=(1, 1), padding=(0, 0),
                          dilation=(1, 1), mode="topk", threshold=0.0, k=64)
        assert predicted_strategy(one, small) == ("native", native.ORIENT_PIX)
        assert predicted_strategy(one, 7 * 7) == ("native", native.ORIENT_CO)
        # as many MACs on a 28x28 map: the channels-last orientation beats oneDNN there
        wide = GatedConv2d(torch.randn(512, 512, 3, 3), None, stride=(1, 1), padding=(1, 1),
                           dilation=(1, 1), mode="topk", threshold=0.0, k=256)
        assert 512 * 512 * 9 * small >= LARGE_LAYER_MACS
        assert predicted_strategy(wide, small) == ("native", native.ORIENT_CL)
        few = GatedConv2d(torch.randn(16, 16, 3, 3), None, stride=(1, 1), padding=(1, 1),
                          dilation=(1, 1), mode="topk", threshold=0.0, k=8)
        assert predicted_strategy(few, 32 * 32) == ("native", native.ORIENT_PIX)
        assert predicted_strategy(few, 8 * 8) == ("native", native.ORIENT_CL)


def test_layers_whose_kernel_covers_the_input_take_the_one_position_kernel():
    # VGG-16's first classifier layer as a convolution: 25088 -> 4096 is ~100 M MACs per image
    mod = GatedConv2d(torch.randn(4096, 512, 7, 7), None, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=256)
    if native.available():
        assert predicted_strategy(mod, 1, (7, 7)) == ("native", native.ORIENT_FULL)
        assert candidates(mod, (7, 7))["native:full"] == ("native", native.ORIENT_FULL)
    assert "native:full" not in candidates(mod, (9, 9))
    assert predicted_strategy(mod, 9, (9, 9)) != ("native", native.ORIENT_FULL)


def test_channels_last_maps_offer_and_predict_the_nhwc_kernel():
    mod = GatedConv2d(torch.randn(64, 64, 3, 3), None, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=32)
    assert "nhwc" not in candidates(mod, (28, 28))  # on NCHW maps it would run gather
    if native.available():
        assert candidates(mod, (28, 28), channels_last=True) == {"nhwc": ("nhwc", None),
                                                                 "gather": ("gather", None)}
        assert predicted_strategy(mod, 28 * 28, channels_last=True) == ("nhwc", None)
        assert predicted_strategy(mod, 28 * 28) == ("native", native.ORIENT_CL)
    else:
        assert "nhwc" not in candidates(mod, (28, 28), channels_last=True)
