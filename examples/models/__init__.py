"""Model definitions ispc ships, with a name registry for the CLI and benchmarks.

The ImageNet models mirror torchvision's module names so users' torchvision
checkpoints load without torchvision installed; the CIFAR ones are the usual
small-input adaptations.
"""

from collections.abc import Callable

from torch import nn

from .mobilenetv2 import (
    ConvBNReLU6,
    InvertedResidual,
    MobileNetV2,
    make_divisible,
    mobilenet_v2,
    mobilenet_v2_cifar,
)
from .resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    conv1x1,
    conv3x3,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from .vgg import VGG, VGGCifar, cfgs, make_layers, vgg11_bn, vgg13_bn, vgg16, vgg16_bn, vgg16_cifar, vgg19_bn

from . import mobilenetv2 as _mobilenetv2
from . import resnet as _resnet
from . import vgg as _vgg

__all__ = ["MODELS", "create_model", *_resnet.__all__, *_vgg.__all__, *_mobilenetv2.__all__]

MODELS: dict[str, Callable[..., nn.Module]] = {
    # ImageNet (224x224, 1000 classes), torchvision-compatible state_dicts
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "wide_resnet50_2": wide_resnet50_2,
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "vgg16": vgg16,
    "mobilenet_v2": mobilenet_v2,
    # CIFAR (32x32, 10 classes)
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16_cifar": vgg16_cifar,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` go to its constructor (e.g. ``num_classes``)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)
