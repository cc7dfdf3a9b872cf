"""MobileNetV2 with torchvision's exact module layout, plus a CIFAR variant.

Mirrors ``torchvision.models.mobilenetv2`` (``features.N``, ``InvertedResidual.conv``,
conv-BN-ReLU6 blocks as Sequentials) so torchvision weights load as-is. Depthwise convs
and linear bottlenecks (no activation after the projection) are the cases that make
channel gating on MobileNets different from ResNets.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ConvBNReLU6",
    "InvertedResidual",
    "MobileNetV2",
    "make_divisible",
    "mobilenet_v2",
    "mobilenet_v2_cifar",
]

_IMAGENET_SETTING: list[list[int]] = [
    # t (expansion), c (out channels), n (repeats), s (first stride)
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]

# 32x32 inputs: the stem and the 24-channel stage keep stride 1 (as in the common
# kuangliu/pytorch-cifar adaptation), so the last feature map is 4x4 instead of 1x1.
_CIFAR_SETTING: list[list[int]] = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round channel counts to a multiple of ``divisor`` without dropping more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6, as a Sequential so keys are ``.0/.1/.2``.

    Equivalent to torchvision's ``Conv2dNormActivation(..., activation_layer=nn.ReLU6)``.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                in_planes,
                out_planes,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1); residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; same attribute names and init as torchvision.

    ``stem_stride`` is not a torchvision argument; it only exists for the CIFAR variant.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: list[list[int]] | None = None,
        round_nearest: int = 8,
        dropout: float = 0.2,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        input_channel = 32
        last_channel = 1280

        if inverted_residual_setting is None:
            inverted_residual_setting = _IMAGENET_SETTING
        if len(inverted_residual_setting) == 0 or any(len(row) != 4 for row in inverted_residual_setting):
            raise ValueError(
                f"inverted_residual_setting should be non-empty and a 4-element list, got {inverted_residual_setting}"
            )

        input_channel = make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=stem_stride)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """ImageNet MobileNetV2 (3.5M params at width 1.0, 1000 classes)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, **kwargs)


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs: stride-1 stem and stride-1 24-channel stage."""
    kwargs.setdefault("inverted_residual_setting", _CIFAR_SETTING)
    kwargs.setdefault("stem_stride", 1)
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, **kwargs)
