"""Property-based tests: random CNNs compile to themselves at keep 1.0; the operator equals the
reference at any keep ratio and batch size."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ispc
from conftest import rel_err, threshold_between
from ispc.ops import gated_conv as gc

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class RandomNet(nn.Module):
    """A CNN assembled from a drawn list of blocks."""

    def __init__(self, blocks: list[tuple], width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.kinds = []
        c = width
        for kind, k, stride, dil, groups in blocks:
            if kind == "conv":
                g = groups if c % groups == 0 else 1
                self.blocks.append(nn.Sequential(
                    nn.Conv2d(c, c, k, stride=stride, padding=dil * (k // 2), dilation=dil, groups=g,
                              bias=False), nn.BatchNorm2d(c), nn.ReLU()))
            elif kind == "residual":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.ReLU()))
            elif kind == "concat":
                self.blocks.append(nn.Conv2d(c, c // 2, 1))
            else:  # pool
                self.blocks.append(nn.MaxPool2d(2, ceil_mode=True))
            self.kinds.append(kind)
            if kind == "concat":
                c = c + c // 2
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = x + block(x)
            elif kind == "concat":
                x = torch.cat([x, block(x)], 1)
            else:
                x = block(x)
        return self.head(x.mean((2, 3)))


block = st.tuples(st.sampled_from(["conv", "residual", "concat", "pool"]), st.sampled_from([1, 3, 5]),
                  st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2, 4, 16]))


@SETTINGS
@given(blocks=st.lists(block, min_size=1, max_size=5), width=st.sampled_from([16, 20, 32]),
       mode=st.sampled_from(["threshold", "topk"]), seed=st.integers(0, 1000))
def test_random_cnn_compiles_to_itself_at_keep_one(blocks, width, mode, seed):
    torch.manual_seed(seed)
    model = RandomNet(blocks, width).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    data = [torch.randn(4, 3, 24, 24)]
    compiled = ispc.compile(model, data, progress=False,
                            config=ispc.GatingConfig(keep_ratio=1.0, mode=mode))
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4


@SETTINGS
@given(n=st.integers(1, 16), cin=st.integers(1, 40), cout=st.integers(1, 24),
       k=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 3), dil=st.integers(1, 2),
       pad=st.integers(0, 2), size=st.integers(5, 12), keep=st.floats(0.05, 1.0),
       mode=st.sampled_from([gc.THRESHOLD, gc.TOPK]), sal=st.sampled_from([0, 1]),
       seed=st.integers(0, 10_000))
def test_operator_equals_reference(n, cin, cout, k, stride, dil, pad, size, keep, mode, sal, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g)
    b = torch.randn(cout, generator=g)
    scale = torch.rand(cin, generator=g) + 0.5
    s = gc.channel_saliency(x, scale, sal)
    thr = threshold_between(s, keep) if keep < 1 else 0.0
    kk = max(1, round(keep * cin))
    args = (x, w, b, scale, stride, stride, pad, pad, dil, dil, mode, thr, kk, sal)
    ref = gc.gated_conv2d_reference(*args)
    for fn in (gc.gated_conv2d_loop, gc.gated_conv2d_grouped, torch.ops.ispc.gated_conv2d):
        assert rel_err(fn(*args), ref) <= 1e-5
