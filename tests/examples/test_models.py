"""The shipped example models: registry, torchvision compatibility, shapes, FX traceability.

Parameter counts and state_dict keys are checked on the meta device (no memory, no
init cost); forward/trace equality runs on CPU for models that build in well under a
second, and on meta (shapes only) for the 100M+-parameter ones.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

try:  # installed package
    from ispc.examples import models
except ImportError:  # uninstalled checkout: ``examples/`` is a top-level package at the repo root
    _ROOT = str(Path(__file__).resolve().parents[2])
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from examples import models


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny convs on a shared 2-core box run faster (and steadier) on one thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


IMAGENET = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "vgg16",
    "mobilenet_v2",
]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_cifar", "mobilenet_v2_cifar"]

# Models too large to build with real weights in a fast test (VGG's 25088x4096 Linear,
# ResNet-152, WRN-50-2); their forward/trace is checked on the meta device instead.
# One ImageNet VGG (vgg16, the BN-free trunk) still runs for real; vgg16_cifar covers the BN trunk.
META_ONLY = {"resnet152", "wide_resnet50_2", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"}

# torchvision's published parameter counts (1000 classes); CIFAR ones are ours (option-B shortcuts).
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "vgg16": 138_357_544,
    "mobilenet_v2": 3_504_872,
    # He et al. report 0.27M for ResNet-20 with option-A (parameter-free) shortcuts:
    # 269,722; option B adds two 1x1 conv+BN projections (16->32, 32->64) = 2,752.
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet44": 661_338,
    "resnet56": 855_770,
    "resnet110": 1_730_714,
    # vgg16 trunk 14,714,688 + 13 BNs 8,448 + Linear(512, 10) 5,130
    "vgg16_cifar": 14_728_266,
    # mobilenet_v2 with a 10-way head: 3,504,872 - 1,281,000 + 12,810
    "mobilenet_v2_cifar": 2_236_682,
}


def _input_size(name: str) -> int:
    """Small inputs keep CPU tests fast; VGG's adaptive 7x7 pool accepts 32x32 (1x1 maps)."""
    return 32 if name in CIFAR or name.startswith("vgg") else 64


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return models.create_model(name, **kwargs)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_model() -> None:
    assert set(models.MODELS) == set(IMAGENET) | set(CIFAR)
    assert set(PARAM_COUNTS) == set(models.MODELS)
    for name, factory in models.MODELS.items():
        assert name in models.__all__ and getattr(models, name) is factory


def test_create_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        models.create_model("resnet19")
    msg = str(info.value)
    assert "resnet19" in msg
    for name in ("resnet18", "vgg16_cifar", "mobilenet_v2_cifar"):
        assert name in msg


def test_create_model_forwards_kwargs() -> None:
    model = models.create_model("resnet20", num_classes=7)
    assert isinstance(model, models.CifarResNet)
    assert model.fc.out_features == 7
    assert _meta("mobilenet_v2", num_classes=5).classifier[1].out_features == 5


def test_all_names_importable() -> None:
    for name in models.__all__:
        assert hasattr(models, name), name


# --------------------------------------------------------------------------- torchvision compatibility


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name: str) -> None:
    assert _num_params(_meta(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        (
            "resnet18",
            {
                "conv1.weight": (64, 3, 7, 7),
                "bn1.running_mean": (64,),
                "layer1.0.conv1.weight": (64, 64, 3, 3),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                "layer2.0.downsample.1.num_batches_tracked": (),
                "layer4.1.bn2.running_var": (512,),
                "fc.weight": (1000, 512),
            },
        ),
        (
            "resnet50",
            {
                "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                "layer1.0.downsample.1.running_var": (256,),
                "layer1.0.conv2.weight": (64, 64, 3, 3),
                "layer3.5.bn3.weight": (1024,),
                "layer4.2.conv3.weight": (2048, 512, 1, 1),
                "fc.weight": (1000, 2048),
                "fc.bias": (1000,),
            },
        ),
        (
            "resnext50_32x4d",
            {"layer1.0.conv2.weight": (128, 4, 3, 3), "layer4.0.conv1.weight": (1024, 1024, 1, 1)},
        ),
        ("wide_resnet50_2", {"layer1.0.conv1.weight": (128, 64, 1, 1), "layer4.2.conv3.weight": (2048, 1024, 1, 1)}),
        (
            "mobilenet_v2",
            {
                "features.0.0.weight": (32, 3, 3, 3),
                "features.0.1.running_mean": (32,),
                "features.1.conv.0.0.weight": (32, 1, 3, 3),
                "features.1.conv.1.weight": (16, 32, 1, 1),
                "features.1.conv.2.running_var": (16,),
                "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.2.conv.1.0.weight": (96, 1, 3, 3),
                "features.2.conv.2.weight": (24, 96, 1, 1),
                "features.2.conv.3.bias": (24,),
                "features.17.conv.2.weight": (320, 960, 1, 1),
                "features.18.0.weight": (1280, 320, 1, 1),
                "features.18.1.weight": (1280,),
                "classifier.1.weight": (1000, 1280),
            },
        ),
        (
            "vgg16_bn",
            {
                "features.0.weight": (64, 3, 3, 3),
                "features.0.bias": (64,),
                "features.1.running_mean": (64,),
                "features.40.weight": (512, 512, 3, 3),
                "features.41.running_var": (512,),
                "classifier.0.weight": (4096, 25088),
                "classifier.3.weight": (4096, 4096),
                "classifier.6.weight": (1000, 4096),
                "classifier.6.bias": (1000,),
            },
        ),
        (
            "vgg16",
            {"features.0.weight": (64, 3, 3, 3), "features.28.weight": (512, 512, 3, 3), "classifier.6.bias": (1000,)},
        ),
        ("vgg11_bn", {"features.25.weight": (512, 512, 3, 3), "features.26.running_mean": (512,)}),
        ("vgg19_bn", {"features.49.weight": (512, 512, 3, 3), "features.50.running_mean": (512,)}),
        (
            "resnet20",
            {
                "conv1.weight": (16, 3, 3, 3),
                "layer2.0.downsample.0.weight": (32, 16, 1, 1),
                "layer3.0.downsample.1.running_mean": (64,),
                "layer3.2.conv2.weight": (64, 64, 3, 3),
                "fc.weight": (10, 64),
            },
        ),
        ("vgg16_cifar", {"features.40.weight": (512, 512, 3, 3), "classifier.weight": (10, 512)}),
    ],
)
def test_state_dict_keys(name: str, keys: dict[str, tuple[int, ...]]) -> None:
    sd = _meta(name).state_dict()
    for key, shape in keys.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


def test_state_dict_has_no_extra_keys() -> None:
    """Only torchvision's keys: e.g. no downsample where torchvision has none."""
    sd = _meta("resnet18").state_dict()
    assert not any(k.startswith("layer1.0.downsample") for k in sd)
    # 20 convs+fc weights, 20 BNs x 5 entries, fc bias: torchvision's resnet18 has 122 keys
    assert len(sd) == 122
    assert len(_meta("resnet50").state_dict()) == 320
    assert len(_meta("mobilenet_v2").state_dict()) == 314


def test_state_dict_round_trip_strict() -> None:
    src = models.resnet20()
    dst = models.resnet20()
    dst.load_state_dict(src.state_dict(), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


# --------------------------------------------------------------------------- init and options


def test_resnet_init_matches_torchvision() -> None:
    torch.manual_seed(0)
    model = models.resnet18()
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (64 * 7 * 7))
    std = model.conv1.weight.std().item()
    assert abs(std - (2.0 / (64 * 49)) ** 0.5) < 0.05 * std
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_vgg_and_mobilenet_linear_init() -> None:
    torch.manual_seed(0)
    vgg = models.vgg16_cifar()
    assert abs(vgg.classifier.weight.std().item() - 0.01) < 0.001
    assert torch.all(vgg.features[0].bias == 0)
    mnv2 = models.mobilenet_v2_cifar()
    assert abs(mnv2.classifier[1].weight.std().item() - 0.01) < 0.001


def test_zero_init_residual() -> None:
    model = models.resnet18(zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 8
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)


def test_resnet_width_and_groups_args() -> None:
    resnext = _meta("resnext50_32x4d")
    assert resnext.layer1[0].conv2.groups == 32
    assert resnext.layer1[0].conv2.out_channels == 128
    wide = _meta("resnet50", width_per_group=128)
    assert wide.layer1[0].conv1.out_channels == 128
    assert _num_params(wide) == PARAM_COUNTS["wide_resnet50_2"]
    with pytest.raises(ValueError, match="BasicBlock only supports"):
        models.resnet18(groups=2)


def test_resnet_replace_stride_with_dilation() -> None:
    model = _meta("resnet50", replace_stride_with_dilation=[False, True, True])
    assert model.layer3[0].conv2.dilation == (1, 1) and model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    feats = nn.Sequential(*list(model.children())[:-2])(torch.empty(1, 3, 64, 64, device="meta"))
    assert tuple(feats.shape) == (1, 2048, 8, 8)


def test_cifar_resnet_structure() -> None:
    model = _meta("resnet56")
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [9, 9, 9]
    assert model.layer1[0].downsample is None
    assert isinstance(model.layer2[0].downsample, nn.Sequential)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.CifarResNet(21)


def test_mobilenet_v2_width_mult() -> None:
    half = _meta("mobilenet_v2", width_mult=0.5)
    assert half.features[0][0].out_channels == 16
    assert half.last_channel == 1280
    wide = _meta("mobilenet_v2", width_mult=1.4)
    assert wide.features[0][0].out_channels == 48
    assert wide.last_channel == 1792
    assert isinstance(wide.features[1].conv[0], models.ConvBNReLU6)
    assert isinstance(wide.features[1].conv[0][2], nn.ReLU6)


def test_mobilenet_v2_residual_and_depthwise() -> None:
    model = _meta("mobilenet_v2")
    blocks = [m for m in model.features if isinstance(m, models.InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for b in blocks) == 10
    for b in blocks:
        dw = b.conv[-3][0]
        assert dw.groups == dw.in_channels == dw.out_channels


def test_cifar_feature_map_sizes() -> None:
    x = torch.empty(1, 3, 32, 32, device="meta")
    assert tuple(_meta("mobilenet_v2_cifar").eval().features(x).shape) == (1, 1280, 4, 4)
    assert tuple(_meta("mobilenet_v2").eval().features(x).shape) == (1, 1280, 1, 1)
    assert tuple(_meta("vgg16_cifar").eval().features(x).shape) == (1, 512, 1, 1)


# --------------------------------------------------------------------------- forward and tracing


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_meta_forward_shape_and_trace(name: str) -> None:
    model = _meta(name, num_classes=11).eval()
    size = _input_size(name)
    x = torch.empty(2, 3, size, size, device="meta")
    assert tuple(model(x).shape) == (2, 11)
    traced = torch.fx.symbolic_trace(model)
    assert tuple(traced(x).shape) == (2, 11)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    convs = [t for t in calls if isinstance(model.get_submodule(t), nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", [n for n in IMAGENET + CIFAR if n not in META_ONLY])
def test_trace_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    size = _input_size(name)
    x = torch.randn(2, 3, size, size)
    num_classes = 10 if name in CIFAR else 1000
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)
        out = traced(x)
    assert eager.shape == (2, num_classes)
    assert torch.isfinite(eager).all()
    assert not torch.equal(eager[0], eager[1])  # the input actually reaches the logits
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_resnet_trace_keeps_torchvision_module_paths() -> None:
    traced = torch.fx.symbolic_trace(_meta("resnet50"))
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    for t in ("conv1", "maxpool", "layer1.0.conv1", "layer1.0.downsample.0", "layer4.2.bn3", "avgpool", "fc"):
        assert t in targets, t
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in getattr(n.target, "__name__", "")]
    assert len(adds) == 16  # one residual add per bottleneck
