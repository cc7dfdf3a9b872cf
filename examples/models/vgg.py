"""VGG with torchvision's exact module layout, plus a CIFAR VGG-16-BN.

The ImageNet variants mirror ``torchvision.models.vgg`` (``features``/``avgpool``/
``classifier`` with the same Sequential indices) so torchvision weights load as-is.
"""

from typing import cast

import torch
from torch import Tensor, nn

__all__ = [
    "VGG",
    "VGGCifar",
    "cfgs",
    "make_layers",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "vgg16",
    "vgg16_cifar",
]

cfgs: dict[str, list[str | int]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(cfg: list[str | int], batch_norm: bool = False) -> nn.Sequential:
    """Build the conv trunk exactly as torchvision does (so ``features.N`` indices match)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = cast(int, v)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """torchvision's VGG init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


class VGG(nn.Module):
    """ImageNet VGG (224x224 input); same attribute names as torchvision."""

    def __init__(
        self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


class VGGCifar(nn.Module):
    """CIFAR VGG (32x32 input): the five max-pools bring the map to 1x1, then one Linear."""

    def __init__(self, features: nn.Module, num_classes: int = 10, init_weights: bool = True) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(512, num_classes)
        if init_weights:
            _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def vgg11_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-11 with BatchNorm (config "A")."""
    return VGG(make_layers(cfgs["A"], batch_norm=True), num_classes=num_classes, **kwargs)


def vgg13_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-13 with BatchNorm (config "B")."""
    return VGG(make_layers(cfgs["B"], batch_norm=True), num_classes=num_classes, **kwargs)


def vgg16_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-16 with BatchNorm (config "D")."""
    return VGG(make_layers(cfgs["D"], batch_norm=True), num_classes=num_classes, **kwargs)


def vgg19_bn(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-19 with BatchNorm (config "E")."""
    return VGG(make_layers(cfgs["E"], batch_norm=True), num_classes=num_classes, **kwargs)


def vgg16(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG-16 without BatchNorm: convs carry biases and feed ReLU directly (nothing to fold)."""
    return VGG(make_layers(cfgs["D"], batch_norm=False), num_classes=num_classes, **kwargs)


def vgg16_cifar(num_classes: int = 10, **kwargs) -> VGGCifar:
    """CIFAR VGG-16 with BatchNorm for 32x32 inputs."""
    return VGGCifar(make_layers(cfgs["D"], batch_norm=True), num_classes=num_classes, **kwargs)
