"""Small test models reproducing the graph structures of torchvision/timm/Hugging Face CNNs.

Users bring models we do not ship (EfficientNet, DenseNet, RegNet, ConvNeXt,
ShuffleNet, Swin, ViT, MaxViT, ...). Each class below keeps the *structural* features a compiler
pass must cope with -- squeeze-excitation multiplies, concatenations, grouped and
depthwise convs, channels-last LayerNorm/Linear, channel shuffles, chunk/split,
functional convs, window attention with relative position bias and shifted windows, class
tokens and nn.MultiheadAttention, block/grid partitions, dual paths, partial residuals -- at a
size (<= 64 channels, 32x32 input) that runs in milliseconds on a CPU. ``ZOO`` models are
``torch.fx.symbolic_trace``-able; ``FAMILIES`` maps each standard family to one (plus ReXNet,
which only torch.export captures); ``hf_model`` builds the Hugging Face families.
"""

import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

try:  # installed package
    from ispc.examples import models as example_models
except ImportError:  # uninstalled checkout: ``examples/`` is a top-level package at the repo root
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from examples import models as example_models

__all__ = [
    "INPUT_SHAPE",
    "SmallResidualNet",
    "ZOO",
    "FAMILIES",
    "LayerNorm2d",
    "SqueezeExcitation",
    "StochasticDepth",
    "TinyConvNeXt",
    "TinyDenseNet",
    "TinyEfficientNet",
    "TinyMixed",
    "TinyRegNet",
    "TinyShuffleNet",
    "TinyResNet",
    "TinyMobileNetV3",
    "TinyEfficientNetV2",
    "TinyGoogLeNet",
    "TinySqueezeNet",
    "TinyMNASNet",
    "TinyDLA",
    "TinyDPN",
    "TinyGhostNet",
    "TinyReXNet",
    "TvConvNeXt",
    "TinySwin",
    "TinyViT",
    "TinyMaxViT",
    "shifted_window_attention",
    "Untraceable",
    "channel_shuffle",
    "ConvNeXtBlock",
    "DataDependentBlock",
    "MBConv",
    "ShuffleUnit",
    "example_input",
    "hf_model",
    "HF_MODELS",
    "calibrate_norm_",
    "randomize_norm_",
    "realistic",
    "seeded",
    "stochastic_depth",
]

#: Input shape every ZOO model accepts (batch 2 so BatchNorm in train mode works).
INPUT_SHAPE: tuple[int, int, int, int] = (2, 3, 32, 32)


def example_input(batch: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    """Deterministic NCHW input without touching the global RNG."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@torch.no_grad()
def randomize_norm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats, like a trained net.

    Fresh BNs (mean 0, var 1, weight 1, bias 0) are identities in eval mode, which hides
    bugs in BN folding.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if m.weight is not None and m.bias is not None:
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@torch.no_grad()
def calibrate_norm_(model: nn.Module, seed: int = 0, batch: int = 8, size: int = 32) -> nn.Module:
    """Set BatchNorm running stats to those of one random batch (the rest of the model in eval).

    With fresh init, eval-mode activations shrink layer by layer (MobileNetV2's logits
    are ~1e-9), so any wrong transform would still pass ``allclose``; calibrated BNs
    keep activations at unit scale, as in a trained net. Training mode is restored.
    """
    was_training = model.training
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch -> exactly its statistics
        m.train()
    model(example_input(batch, size, seed))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def realistic(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build under ``seed``, then randomize BN affine params and calibrate BN stats."""
    model = seeded(factory, seed)
    randomize_norm_(model, seed)
    calibrate_norm_(model, seed)
    return model


# --------------------------------------------------------------------------- shared blocks


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision.ops.stochastic_depth: drop whole residual branches per sample while training."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# Like torchvision: the function is an FX leaf, so traces contain a call_function node
# for it (with ``training`` frozen at trace time) instead of its body.
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: identity in eval mode."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: per-channel gate = sigmoid(fc2(act(fc1(avgpool(x)))))."""

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


def _conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    activation: Callable[..., nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: Sequential(conv, bn[, act]) with keys 0/1/2."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if activation is not None:
        layers.append(activation(inplace=True) if activation is not nn.GELU else activation())
    return nn.Sequential(*layers)


def _kaiming_init(model: nn.Module) -> None:
    """The torchvision/timm CNN init: fan-out kaiming convs, unit BN, small Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """torchvision EfficientNet MBConv: expand -> depthwise -> SE -> project, stochastic depth."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_ch == out_ch
        expanded = in_ch * expand_ratio
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        if expanded != in_ch:
            layers["expand"] = _conv_bn_act(in_ch, expanded, 1, activation=nn.SiLU)
        layers["depthwise"] = _conv_bn_act(expanded, expanded, kernel_size, stride, groups=expanded, activation=nn.SiLU)
        layers["se"] = SqueezeExcitation(expanded, max(1, in_ch // 4), activation=nn.SiLU)
        layers["project"] = _conv_bn_act(expanded, out_ch, 1, activation=None)
        self.block = nn.Sequential(layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_ch

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class TinyEfficientNet(nn.Module):
    """EfficientNet-B0 structure in miniature (SiLU, depthwise, SE, stochastic depth)."""

    def __init__(self, num_classes: int = 10, stochastic_depth_prob: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # (expand_ratio, kernel, stride, in, out); hidden widths stay <= 64
            setting = [(1, 3, 1, 16, 16), (4, 3, 2, 16, 24), (2, 3, 1, 24, 24), (2, 5, 2, 24, 32), (2, 5, 1, 32, 32)]
            layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, 1, activation=nn.SiLU)]
            for i, (t, k, s, cin, cout) in enumerate(setting):
                sd_prob = stochastic_depth_prob * i / len(setting)
                layers.append(MBConv(cin, cout, t, k, s, sd_prob))
            layers.append(_conv_bn_act(32, 64, 1, activation=nn.SiLU))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(64, num_classes))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """torchvision DenseNet layer: cat(inputs) -> BN-ReLU-conv1x1 -> BN-ReLU-conv3x3."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: list[Tensor]) -> Tensor:
        bottleneck_output = self.bn_function(input)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """torchvision DenseNet block: every layer sees the concatenation of all previous outputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool between dense blocks (halves channels and resolution)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class TinyDenseNet(nn.Module):
    """DenseNet-121 structure in miniature: concatenations feeding BN-ReLU-conv chains."""

    def __init__(
        self,
        num_classes: int = 10,
        growth_rate: int = 8,
        block_config: tuple[int, ...] = (3, 3),
        num_init_features: int = 16,
        bn_size: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                OrderedDict(
                    [
                        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)),
                        ("norm0", nn.BatchNorm2d(num_init_features)),
                        ("relu0", nn.ReLU(inplace=True)),
                    ]
                )
            )
            num_features = num_init_features
            for i, num_layers in enumerate(block_config):
                block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
                self.features.add_module(f"denseblock{i + 1}", block)
                num_features = num_features + num_layers * growth_rate
                if i != len(block_config) - 1:
                    trans = _Transition(num_features, num_features // 2)
                    self.features.add_module(f"transition{i + 1}", trans)
                    num_features = num_features // 2
            self.features.add_module("norm5", nn.BatchNorm2d(num_features))
            self.classifier = nn.Linear(num_features, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# --------------------------------------------------------------------------- RegNet


class _BottleneckTransform(nn.Sequential):
    """torchvision RegNet transform: 1x1 -> grouped 3x3 -> (SE) -> 1x1, named a/b/se/c."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float | None) -> None:
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        w_b = width_out  # bottleneck multiplier 1.0, as in RegNetY
        g = w_b // group_width
        layers["a"] = _conv_bn_act(width_in, w_b, 1)
        layers["b"] = _conv_bn_act(w_b, w_b, 3, stride, groups=g)
        if se_ratio:
            layers["se"] = SqueezeExcitation(w_b, max(1, int(round(se_ratio * width_in))), activation=nn.ReLU)
        layers["c"] = _conv_bn_act(w_b, width_out, 1, activation=None)
        super().__init__(layers)


class _ResBottleneckBlock(nn.Module):
    """torchvision RegNet block: x + f(x), with a 1x1 conv+BN projection when shapes change."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float | None) -> None:
        super().__init__()
        self.proj: nn.Module | None = None
        if width_in != width_out or stride != 1:
            self.proj = _conv_bn_act(width_in, width_out, 1, stride, activation=None)
        self.f = _BottleneckTransform(width_in, width_out, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class TinyRegNet(nn.Module):
    """RegNetX/Y structure in miniature: grouped 3x3 convs (groups = width // group_width)."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64),
        depths: tuple[int, ...] = (1, 2, 1),
        group_width: int = 8,
        se: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = _conv_bn_act(3, 16, 3, 1)
            se_ratio = 0.25 if se else None
            stages: "OrderedDict[str, nn.Module]" = OrderedDict()
            width_in = 16
            for i, (w, d) in enumerate(zip(widths, depths)):
                blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
                for j in range(d):
                    blocks[f"block{i + 1}-{j}"] = _ResBottleneckBlock(
                        width_in, w, 2 if j == 0 and i > 0 else 1, group_width, se_ratio
                    )
                    width_in = w
                stages[f"block{i + 1}"] = nn.Sequential(blocks)
            self.trunk_output = nn.Sequential(stages)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width_in, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


# --------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as a module (timm/torchvision ConvNeXt downsampling)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class ConvNeXtBlock(nn.Module):
    """Original/timm ConvNeXt block: dw7x7 -> NHWC LayerNorm -> Linear-GELU-Linear -> gamma."""

    def __init__(
        self, dim: int, mlp_ratio: int = 4, layer_scale_init_value: float = 1e-6, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = input + self.drop_path(x)
        return x


class TinyConvNeXt(nn.Module):
    """ConvNeXt structure in miniature: patchify stem, channels-last MLPs, LayerNorm2d downsampling."""

    def __init__(
        self,
        num_classes: int = 10,
        dims: tuple[int, ...] = (8, 16, 16),
        depths: tuple[int, ...] = (2, 1, 1),
        layer_scale_init_value: float = 0.5,
        drop_path_rate: float = 0.1,
        seed: int = 0,
    ) -> None:
        """``layer_scale_init_value`` defaults far above ConvNeXt's 1e-6 so blocks are not no-ops."""
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.downsample_layers = nn.ModuleList()
            self.downsample_layers.append(
                nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
            )
            for i in range(len(dims) - 1):
                self.downsample_layers.append(
                    nn.Sequential(
                        LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)
                    )
                )
            total = sum(depths)
            self.stages = nn.ModuleList()
            k = 0
            for dim, depth in zip(dims, depths):
                blocks = []
                for _ in range(depth):
                    blocks.append(ConvNeXtBlock(dim, 4, layer_scale_init_value, drop_path_rate * k / max(1, total - 1)))
                    k += 1
                self.stages.append(nn.Sequential(*blocks))
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            x = stage(x)
        x = self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)
        return self.head(x)


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channel groups; the view/transpose/reshape a channel-gating pass must see through."""
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision ShuffleNetV2 unit: split channels, transform one half, concat, shuffle.

    ``use_split`` picks ``torch.split`` instead of ``Tensor.chunk`` for the stride-1 split
    (both appear in the wild).
    """

    def __init__(self, inp: int, oup: int, stride: int, use_split: bool = False) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("illegal stride value")
        self.stride = stride
        self.use_split = use_split
        branch_features = oup // 2
        if stride == 1 and inp != branch_features << 1:
            raise ValueError(f"stride-1 unit needs inp == oup, got {inp} -> {oup}")

        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()

        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )
        self.split_sizes = [inp // 2, inp - inp // 2]

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            if self.use_split:
                x1, x2 = torch.split(x, self.split_sizes, dim=1)
            else:
                x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    """ShuffleNetV2 structure in miniature: chunk/split, concat, channel shuffle."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = _conv_bn_act(3, 16, 3, 1)
            self.stage2 = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
            self.stage3 = nn.Sequential(ShuffleUnit(32, 64, 2), ShuffleUnit(64, 64, 1, use_split=True))
            self.conv5 = _conv_bn_act(64, 64, 1, 1)
            self.fc = nn.Linear(64, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # global pool
        return self.fc(x)


# --------------------------------------------------------------------------- odd convs


class TinyMixed(nn.Module):
    """Conv corner cases: reflect padding, dilation, stride, bias-free+BN, odd widths, F.conv2d."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv_reflect = nn.Conv2d(3, 13, 3, padding=1, padding_mode="reflect")
            self.relu1 = nn.ReLU()
            self.conv_dilated = nn.Conv2d(13, 29, 3, padding=2, dilation=2)
            self.relu2 = nn.ReLU()
            self.conv_strided = nn.Conv2d(29, 32, 3, stride=2, padding=1)
            self.relu3 = nn.ReLU()
            self.conv_nobias = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(32)
            self.relu4 = nn.ReLU()
            # a conv whose weight is a bare Parameter used through F.conv2d (no nn.Conv2d module)
            self.func_weight = nn.Parameter(torch.empty(48, 32, 3, 3))
            self.func_bias = nn.Parameter(torch.empty(48))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(48, num_classes)
            _kaiming_init(self)
            nn.init.kaiming_normal_(self.func_weight, mode="fan_out")
            nn.init.normal_(self.func_bias, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv_reflect(x))
        x = self.relu2(self.conv_dilated(x))
        x = self.relu3(self.conv_strided(x))
        x = self.relu4(self.bn(self.conv_nobias(x)))
        x = F.conv2d(x, self.func_weight, self.func_bias, stride=1, padding=1)
        x = F.relu(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- untraceable


class DataDependentBlock(nn.Module):
    """Branches on tensor *values*, which symbolic tracing cannot follow."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -x


class Untraceable(nn.Module):
    """``torch.fx.symbolic_trace`` fails inside the submodule named ``router`` (for error-message tests)."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = _conv_bn_act(3, 16, 3, 1, activation=None)  # signed output: both branches reachable
            self.router = DataDependentBlock(16)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.router(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- ResNeXt / Wide-ResNet


class TinyResNet(nn.Module):
    """torchvision's ResNet in miniature, with its own blocks (``examples/models/resnet.py``):
    ResNeXt (grouped 3x3 bottlenecks: ``groups``, ``width_per_group``) and Wide-ResNet (wider
    bottlenecks) differ from ResNet-50 only in these two numbers."""

    def __init__(self, groups: int = 1, width_per_group: int = 64, planes: tuple[int, ...] = (16, 32),
                 num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        from_resnet = example_models.resnet  # the module holding the torchvision-faithful blocks
        block = from_resnet.Bottleneck
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
            layers, inplanes = [], 16
            for i, p in enumerate(planes):
                stride = 1 if i == 0 else 2
                down = nn.Sequential(nn.Conv2d(inplanes, p * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(p * block.expansion))
                layers.append(nn.Sequential(
                    block(inplanes, p, stride, down, groups, width_per_group),
                    block(p * block.expansion, p, 1, None, groups, width_per_group)))
                inplanes = p * block.expansion
            self.layers = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(inplanes, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- MobileNetV3


class _SEHard(nn.Module):
    """torchvision MobileNetV3's SqueezeExcitation: ReLU inside, Hardsigmoid scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x))))) * x


class InvertedResidualV3(nn.Module):
    """torchvision MobileNetV3 block: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1,
    ReLU or Hardswish, residual when shapes allow."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn_act(cin, exp, 1, activation=act))
        layers.append(_conv_bn_act(exp, exp, k, stride, groups=exp, activation=act))
        if se:
            layers.append(_SEHard(exp, max(8, exp // 4)))
        layers.append(_conv_bn_act(exp, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class TinyMobileNetV3(nn.Module):
    """MobileNetV3-Small structure in miniature: Hardswish, SE with Hardsigmoid, 5x5 depthwise."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # (in, kernel, expanded, out, SE, hardswish, stride)
            setting = [(16, 3, 16, 16, True, False, 1), (16, 3, 48, 24, False, False, 2),
                       (24, 3, 64, 24, False, False, 1), (24, 5, 64, 32, True, True, 2),
                       (32, 5, 64, 32, True, True, 1)]
            layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, 1, activation=nn.Hardswish)]
            layers += [InvertedResidualV3(*s) for s in setting]
            layers.append(_conv_bn_act(32, 64, 1, activation=nn.Hardswish))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(64, 64), nn.Hardswish(inplace=True),
                                            nn.Dropout(0.2, inplace=True), nn.Linear(64, num_classes))
            _kaiming_init(self)
            for m in self.classifier:  # PyTorch's default init: logits well away from zero
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- EfficientNetV2


class FusedMBConv(nn.Module):
    """torchvision EfficientNetV2 FusedMBConv: one full kxk expansion conv instead of 1x1 +
    depthwise, then a 1x1 projection; stochastic depth on the residual."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, sd_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        exp = cin * expand
        if exp != cin:
            self.block = nn.Sequential(_conv_bn_act(cin, exp, 3, stride, activation=nn.SiLU),
                                       _conv_bn_act(exp, cout, 1, activation=None))
        else:
            self.block = nn.Sequential(_conv_bn_act(cin, cout, 3, stride, activation=nn.SiLU))
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class TinyEfficientNetV2(nn.Module):
    """EfficientNetV2 structure in miniature: FusedMBConv early, MBConv with SE late."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                _conv_bn_act(3, 16, 3, 1, activation=nn.SiLU),
                FusedMBConv(16, 16, 1, 1, 0.0), FusedMBConv(16, 24, 4, 2, 0.05),
                FusedMBConv(24, 24, 2, 1, 0.1), MBConv(24, 32, 2, 3, 2, 0.1),
                MBConv(32, 32, 2, 3, 1, 0.15), _conv_bn_act(32, 64, 1, activation=nn.SiLU))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, num_classes))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- GoogLeNet / Inception


class BasicConv2d(nn.Module):
    """torchvision GoogLeNet/Inception conv: bias-free conv, BN(eps=0.001), ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """torchvision GoogLeNet Inception module: four branches concatenated on channels."""

    def __init__(self, cin: int, ch1: int, ch3red: int, ch3: int, ch5red: int, ch5: int, pool: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3red, kernel_size=1),
                                     BasicConv2d(ch3red, ch3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5red, kernel_size=1),
                                     BasicConv2d(ch5red, ch5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class TinyGoogLeNet(nn.Module):
    """GoogLeNet structure in miniature: stem, Inception modules, ceil-mode max-pools."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = BasicConv2d(3, 16, kernel_size=3, padding=1)
            self.conv2 = BasicConv2d(16, 32, kernel_size=3, padding=1)
            self.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            self.inception3a = Inception(32, 16, 16, 24, 8, 8, 8)
            self.inception3b = Inception(56, 24, 24, 32, 8, 16, 16)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(88, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv2(self.conv1(x)))
        x = self.inception3b(self.inception3a(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# --------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    """torchvision SqueezeNet Fire module: squeeze 1x1, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class TinySqueezeNet(nn.Module):
    """SqueezeNet 1.1 structure in miniature: Fire modules, a convolutional classifier."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, ceil_mode=True),
                Fire(32, 16, 32, 32), Fire(64, 16, 32, 32),
                nn.MaxPool2d(3, stride=2, ceil_mode=True), Fire(64, 24, 48, 48))
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(96, num_classes, 1),
                                            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- MNASNet


class _InvertedResidualMnas(nn.Module):
    """torchvision MNASNet block: expand 1x1, depthwise kxk, linear project, residual."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, k, padding=k // 2, stride=stride, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x) + x if self.apply_residual else self.layers(x)


class TinyMNASNet(nn.Module):
    """MNASNet structure in miniature: separable stem, stacks of inverted residuals, 5x5 kernels."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                nn.ReLU(inplace=True), nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),
                _InvertedResidualMnas(16, 24, 3, 2, 3), _InvertedResidualMnas(24, 24, 3, 1, 3),
                _InvertedResidualMnas(24, 40, 5, 2, 3), _InvertedResidualMnas(40, 40, 5, 1, 3),
                nn.Conv2d(40, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, num_classes))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))


# --------------------------------------------------------------------------- DLA


class DlaBasic(nn.Module):
    """timm DLA basic block: two 3x3 conv-BN, ReLU, residual given by the tree."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class DlaRoot(nn.Module):
    """timm DLA root: 1x1 conv over the concatenated children, BN, optional residual, ReLU."""

    def __init__(self, cin: int, cout: int, shortcut: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x_children: list[Tensor]) -> Tensor:
        x = self.bn(self.conv(torch.cat(x_children, 1)))
        if self.shortcut:
            x = x + x_children[0]
        return self.relu(x)


class DlaTree(nn.Module):
    """timm DLA tree (one level): two blocks whose outputs, and the downsampled input, the root
    aggregates; a 1x1 projection where the channel count changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) \
            if cin != cout else nn.Identity()
        self.tree1 = DlaBasic(cin, cout, stride)
        self.tree2 = DlaBasic(cout, cout, 1)
        self.root = DlaRoot(2 * cout + cin, cout, shortcut=False)

    def forward(self, x: Tensor) -> Tensor:
        bottom = self.downsample(x)
        shortcut = self.project(bottom)
        x1 = self.tree1(x, shortcut)
        x2 = self.tree2(x1)
        return self.root([x2, x1, bottom])


class TinyDLA(nn.Module):
    """DLA-34 structure in miniature: hierarchical trees whose roots aggregate by concatenation."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.base_layer = nn.Sequential(nn.Conv2d(3, 16, 7, 1, 3, bias=False),
                                            nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            self.level2 = DlaTree(16, 32, 2)
            self.level3 = DlaTree(32, 64, 2)
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Conv2d(64, num_classes, 1)  # timm's DLA classifier is a 1x1 conv
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.level3(self.level2(self.base_layer(x)))
        return torch.flatten(self.fc(self.global_pool(x)), 1)


# --------------------------------------------------------------------------- DPN


class BnActConv2d(nn.Module):
    """timm DPN pre-activation unit: BN, ReLU, conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.act(self.bn(x)))


class DualPathBlock(nn.Module):
    """timm DPN block: a residual path (added) and a dense path (concatenated) share one grouped
    bottleneck; channels split by slicing."""

    def __init__(self, cin: int, r: int, inc: int, groups: int, num_1x1_c: int, project: bool,
                 stride: int = 1) -> None:
        super().__init__()
        self.num_1x1_c, self.inc = num_1x1_c, inc
        self.c1x1_w = BnActConv2d(cin, num_1x1_c + 2 * inc, 1, stride) if project else None
        self.c1x1_a = BnActConv2d(cin, r, 1)
        self.c3x3_b = BnActConv2d(r, r, 3, stride, groups)
        self.c1x1_c = BnActConv2d(r, num_1x1_c + inc, 1)

    def forward(self, x: tuple[Tensor, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        x_in = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.c1x1_w is not None:
            x_s = self.c1x1_w(x_in)
            x_s1, x_s2 = x_s[:, :self.num_1x1_c, :, :], x_s[:, self.num_1x1_c:, :, :]
        else:
            x_s1, x_s2 = x[0], x[1]
        out = self.c1x1_c(self.c3x3_b(self.c1x1_a(x_in)))
        out1, out2 = out[:, :self.num_1x1_c, :, :], out[:, self.num_1x1_c:, :, :]
        return x_s1 + out1, torch.cat([x_s2, out2], 1)


class TinyDPN(nn.Module):
    """DPN structure in miniature: dual-path blocks, grouped 3x3, channel slicing."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False))
            self.block1 = DualPathBlock(16, 16, 8, 4, 32, project=True)
            self.block2 = DualPathBlock(32 + 24, 16, 8, 4, 32, project=False)
            self.block3 = DualPathBlock(32 + 32, 32, 8, 4, 48, project=True, stride=2)
            self.bn = nn.BatchNorm2d(48 + 24)
            self.act = nn.ReLU(inplace=True)
            self.classifier = nn.Conv2d(48 + 24, num_classes, 1)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.act(self.bn(torch.cat(x, 1)))
        return torch.flatten(self.classifier(F.adaptive_avg_pool2d(x, 1)), 1)


# --------------------------------------------------------------------------- GhostNet


class GhostModule(nn.Module):
    """timm/Huawei GhostNet module: a primary 1x1 conv makes half the channels, a cheap depthwise
    conv the other half; concatenated and sliced to the output width."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.oup = cout
        init = -(-cout // 2)
        self.primary_conv = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init),
                                          nn.ReLU(inplace=True) if relu else nn.Identity())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init),
            nn.ReLU(inplace=True) if relu else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: ghost expand, [strided depthwise], [SE], ghost project, shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False) if stride > 1 else None
        self.bn_dw = nn.BatchNorm2d(mid) if stride > 1 else None
        self.se = SqueezeExcitation(mid, max(4, mid // 4)) if se else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if cin == cout and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        return self.ghost2(x) + self.shortcut(shortcut)


class TinyGhostNet(nn.Module):
    """GhostNet structure in miniature."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv_stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.act1 = nn.ReLU(inplace=True)
            self.blocks = nn.Sequential(GhostBottleneck(16, 16, 16, 1, False),
                                        GhostBottleneck(16, 48, 24, 2, False),
                                        GhostBottleneck(24, 64, 32, 2, True),
                                        GhostBottleneck(32, 64, 32, 1, True))
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.conv_head = nn.Conv2d(32, 64, 1)
            self.act2 = nn.ReLU(inplace=True)
            self.classifier = nn.Linear(64, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- ReXNet


class LinearBottleneck(nn.Module):
    """timm ReXNet block: [expand 1x1 SiLU], depthwise 3x3, SE, ReLU6, linear project; the
    residual is added to the first ``in_channels`` output channels only (an in-place slice add)."""

    def __init__(self, cin: int, cout: int, stride: int, exp_ratio: float, se: bool) -> None:
        super().__init__()
        self.use_shortcut = stride == 1 and cin <= cout
        self.in_channels = cin
        mid = int(round(cin * exp_ratio)) if exp_ratio != 1.0 else cin
        self.conv_exp = _conv_bn_act(cin, mid, 1, activation=nn.SiLU) if exp_ratio != 1.0 else None
        self.conv_dw = _conv_bn_act(mid, mid, 3, stride, groups=mid, activation=None)
        self.se = SqueezeExcitation(mid, max(4, mid // 12)) if se else None
        self.act_dw = nn.ReLU6()
        self.conv_pwl = _conv_bn_act(mid, cout, 1, activation=None)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv_pwl(self.act_dw(x))
        if self.use_shortcut:
            x[:, 0:self.in_channels] += shortcut
        return x


class TinyReXNet(nn.Module):
    """ReXNet structure in miniature: channel counts growing linearly, partial residuals."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = _conv_bn_act(3, 16, 3, 1, activation=nn.SiLU)
            self.features = nn.Sequential(
                LinearBottleneck(16, 16, 1, 1.0, False), LinearBottleneck(16, 24, 2, 6.0, False),
                LinearBottleneck(24, 28, 1, 2.0, True), LinearBottleneck(28, 36, 2, 2.0, True),
                LinearBottleneck(36, 40, 1, 1.5, True), _conv_bn_act(40, 64, 1, activation=nn.SiLU))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                      nn.Linear(64, num_classes))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.stem(x)))


# --------------------------------------------------------------------------- torchvision ConvNeXt


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision ConvNeXt block: the layers in one Sequential with Permute modules, layer scale
    as a (C, 1, 1) parameter applied in NCHW."""

    def __init__(self, dim: int, layer_scale: float, sd_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: Tensor) -> Tensor:
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class TvConvNeXt(nn.Module):
    """torchvision's ConvNeXt in miniature (CNBlock, LayerNorm2d downsampling, Flatten head)."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, ...] = (16, 32), seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4),
                                                     LayerNorm2d(dims[0], eps=1e-6))]
            for i, d in enumerate(dims):
                layers.append(nn.Sequential(CNBlock(d, 0.5, 0.0), CNBlock(d, 0.5, 0.1)))
                if i + 1 < len(dims):
                    layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6),
                                                nn.Conv2d(d, dims[i + 1], 2, 2)))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                            nn.Linear(dims[-1], num_classes))
            _kaiming_init(self)
            for m in self.modules():
                if isinstance(m, CNBlock):
                    nn.init.constant_(m.layer_scale, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------- Swin


def _relative_position_index(wh: int, ww: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).flatten()


def shifted_window_attention(x: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                             relative_position_bias: Tensor, window_size: list[int], num_heads: int,
                             shift_size: list[int], qkv_bias: Tensor | None = None,
                             proj_bias: Tensor | None = None) -> Tensor:
    """torchvision's shifted_window_attention (without dropout): pad to whole windows, cyclic
    shift, window partition, multi-head attention with relative position bias and the shifted
    windows' mask, reverse."""
    b, h, w, c = x.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= ph:
        shift_size[0] = 0
    if window_size[1] >= pw:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    nw = (ph // window_size[0]) * (pw // window_size[1])
    x = x.view(b, ph // window_size[0], window_size[0], pw // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window_size[0] * window_size[1], c)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + relative_position_bias
    if sum(shift_size) > 0:
        mask = x.new_zeros((ph, pw))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(ph // window_size[0], window_size[0], pw // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(nw, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(b, ph // window_size[0], pw // window_size[1], window_size[0], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


# as torchvision does: torch.fx keeps the attention one call (its layers then hide inside it)
torch.fx.wrap("shifted_window_attention")


class ShiftedWindowAttention(nn.Module):
    """torchvision Swin attention: qkv and proj Linear modules whose weights the attention
    function reads, a relative position bias table indexed by a buffer."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = window_size, shift_size, num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads) * 0.02)
        self.register_buffer("relative_position_index", _relative_position_index(*window_size))

    def forward(self, x: Tensor) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, bias, self.window_size,
                                        self.num_heads, self.shift_size, self.qkv.bias, self.proj.bias)


class SwinBlock(nn.Module):
    """torchvision SwinTransformerBlock: pre-norm window attention and MLP on N x H x W x C."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, sd_prob: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, [window, window], [shift, shift], heads)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """torchvision Swin patch merging: 2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :],
                       x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    """Swin-T structure in miniature: patch embedding, shifted window attention with relative
    position bias, MLPs and patch merging on N x H x W x C maps."""

    def __init__(self, num_classes: int = 10, dim: int = 16, window: int = 4, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Sequential(nn.Conv2d(3, dim, 2, 2), Permute([0, 2, 3, 1]), nn.LayerNorm(dim)),
                nn.Sequential(SwinBlock(dim, 2, window, 0, 0.0),
                              SwinBlock(dim, 2, window, window // 2, 0.05)),
                PatchMerging(dim),
                nn.Sequential(SwinBlock(2 * dim, 4, window, 0, 0.1),
                              SwinBlock(2 * dim, 4, window, window // 2, 0.1)))
            self.norm = nn.LayerNorm(2 * dim)
            self.permute = Permute([0, 3, 1, 2])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten(1)
            self.head = nn.Linear(2 * dim, num_classes)
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.permute(self.norm(self.features(x)))
        return self.head(self.flatten(self.avgpool(x)))


# --------------------------------------------------------------------------- ViT


class EncoderBlock(nn.Module):
    """torchvision ViT encoder block: LayerNorm, nn.MultiheadAttention, LayerNorm, MLP."""

    def __init__(self, heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(0.0))

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + input
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """torchvision ViT-B structure in miniature: patchify conv, class token, position embedding,
    encoder blocks, the class token's head."""

    def __init__(self, num_classes: int = 10, patch: int = 8, dim: int = 32, layers: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_size, self.hidden_dim = patch, dim
            self.conv_proj = nn.Conv2d(3, dim, patch, patch)
            self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embedding = nn.Parameter(torch.randn(1, (32 // patch) ** 2 + 1, dim) * 0.02)
            self.layers = nn.Sequential(*[EncoderBlock(2, dim, 2 * dim) for _ in range(layers)])
            self.ln = nn.LayerNorm(dim, eps=1e-6)
            self.heads = nn.Sequential(nn.Linear(dim, num_classes))
            _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.heads(x[:, 0])


# --------------------------------------------------------------------------- MaxViT


class MaxVitMBConv(nn.Module):
    """torchvision MaxViT MBConv: pre-norm BN, 1x1 expand, strided depthwise 3x3, SE, 1x1
    project; an average-pool + 1x1 projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cout * 4
        self.proj = nn.Sequential(nn.AvgPool2d(3, stride, 1), nn.Conv2d(cin, cout, 1)) \
            if stride > 1 or cin != cout else nn.Identity()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(cin), _conv_bn_act(cin, mid, 1, activation=nn.GELU),
            _conv_bn_act(mid, mid, 3, stride, groups=mid, activation=nn.GELU),
            SqueezeExcitation(mid, cout // 4, activation=nn.SiLU), nn.Conv2d(mid, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + self.layers(x)


class RelativePositionalMultiHeadAttention(nn.Module):
    """torchvision MaxViT attention over N x G x P x D partitions: to_qkv and merge Linear
    layers (their first dimension is the batch), relative position bias."""

    def __init__(self, dim: int, head_dim: int, p: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.size = dim // head_dim, head_dim, p
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.merge = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * p - 1) ** 2, self.n_heads) * 0.02)
        self.register_buffer("relative_position_index", _relative_position_index(p, p))

    def forward(self, x: Tensor) -> Tensor:
        b, g, p, d = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        v = v.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q * self.head_dim ** -0.5, k)
        n = self.size * self.size
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        dot = F.softmax(dot + bias.permute(2, 0, 1).contiguous().unsqueeze(0), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, d))


class PartitionAttentionLayer(nn.Module):
    """torchvision MaxViT block or grid attention: partition the map into windows (``block``) or
    a dilated grid (``grid``), attention and MLP per partition, departition."""

    def __init__(self, dim: int, p: int, grid: bool) -> None:
        super().__init__()
        self.p, self.grid = p, grid
        self.attn_layer = nn.Sequential(nn.LayerNorm(dim), RelativePositionalMultiHeadAttention(dim, 8, p))
        self.mlp_layer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                       nn.Linear(4 * dim, dim))
        self.stochastic_depth = StochasticDepth(0.0, "row")

    def _partition(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.p
        if self.grid:  # a p x p grid of pixels h // p apart
            x = x.reshape(b, c, p, h // p, p, w // p).permute(0, 3, 5, 2, 4, 1)
        else:  # p x p windows
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p, c)

    def _departition(self, x: Tensor, h: int, w: int) -> Tensor:
        b, g, pp, c = x.shape
        p = self.p
        if self.grid:
            x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 3, 1, 4, 2)
        else:
            x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = self._partition(x)
        x = x + self.stochastic_depth(self.attn_layer(x))
        x = x + self.stochastic_depth(self.mlp_layer(x))
        return self._departition(x, h, w)


class TinyMaxViT(nn.Module):
    """MaxViT structure in miniature: conv stem, then MBConv + block attention + grid attention."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Sequential(_conv_bn_act(3, 16, 3, 2, activation=nn.GELU),
                                      nn.Conv2d(16, 16, 3, padding=1))
            self.blocks = nn.Sequential(
                MaxVitMBConv(16, 32, 2), PartitionAttentionLayer(32, 4, grid=False),
                PartitionAttentionLayer(32, 4, grid=True))
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(32),
                                            nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, num_classes))
            _kaiming_init(self)
            for m in self.classifier:  # PyTorch's default init: logits well away from zero
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------- registry

#: Traceable models that run at ``INPUT_SHAPE``. Each factory is deterministic and returns a
#: model in training mode whose BatchNorms have random affine params and running stats
#: calibrated on random data (see ``realistic``), so eval-mode outputs are not vanishing.
ZOO: dict[str, Callable[[], nn.Module]] = {
    "efficientnet": lambda: realistic(TinyEfficientNet),
    "densenet": lambda: realistic(TinyDenseNet),
    "regnet": lambda: realistic(lambda: TinyRegNet(se=True)),
    "regnet_nose": lambda: realistic(lambda: TinyRegNet(se=False)),
    "convnext": lambda: realistic(TinyConvNeXt),
    "shufflenet": lambda: realistic(TinyShuffleNet),
    "mixed": lambda: realistic(TinyMixed),
    "resnet20": lambda: realistic(lambda: example_models.resnet20(num_classes=10)),
    "resnet18": lambda: realistic(lambda: example_models.resnet18(num_classes=10)),
    "mobilenet_v2_cifar": lambda: realistic(lambda: example_models.mobilenet_v2_cifar(num_classes=10)),
    "vgg16_cifar": lambda: realistic(lambda: example_models.vgg16_cifar(num_classes=10)),
    "resnext": lambda: realistic(lambda: TinyResNet(groups=4, width_per_group=16)),
    "wide_resnet": lambda: realistic(lambda: TinyResNet(width_per_group=128)),
    "mobilenet_v3": lambda: realistic(TinyMobileNetV3),
    "efficientnet_v2": lambda: realistic(TinyEfficientNetV2),
    "googlenet": lambda: realistic(TinyGoogLeNet),
    "squeezenet": lambda: realistic(TinySqueezeNet),
    "mnasnet": lambda: realistic(TinyMNASNet),
    "dla": lambda: realistic(TinyDLA),
    "dpn": lambda: realistic(TinyDPN),
    "ghostnet": lambda: realistic(TinyGhostNet),
    "convnext_tv": lambda: realistic(TvConvNeXt),
    "swin": lambda: realistic(TinySwin),
    "vit": lambda: realistic(TinyViT),
    "maxvit": lambda: realistic(TinyMaxViT),
}

#: the standard families of torchvision and timm, each by the zoo model with its characteristic
#: blocks (family -> ZOO name or factory); models torch.fx cannot trace are here only (ReXNet's
#: in-place slice residual: ispc captures it with torch.export). ``HF_MODELS`` are the Hugging
#: Face families (``hf_model``).
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet": ZOO["resnet18"], "resnext": ZOO["resnext"], "wide_resnet": ZOO["wide_resnet"],
    "vgg": ZOO["vgg16_cifar"], "mobilenet_v2": ZOO["mobilenet_v2_cifar"],
    "mobilenet_v3": ZOO["mobilenet_v3"], "efficientnet": ZOO["efficientnet"],
    "efficientnet_v2": ZOO["efficientnet_v2"], "regnet": ZOO["regnet"], "densenet": ZOO["densenet"],
    "googlenet": ZOO["googlenet"], "shufflenet": ZOO["shufflenet"], "squeezenet": ZOO["squeezenet"],
    "mnasnet": ZOO["mnasnet"], "convnext": ZOO["convnext"], "convnext_tv": ZOO["convnext_tv"],
    "swin": ZOO["swin"], "maxvit": ZOO["maxvit"], "vit": ZOO["vit"], "dla": ZOO["dla"],
    "dpn": ZOO["dpn"], "ghostnet": ZOO["ghostnet"], "rexnet": lambda: realistic(TinyReXNet),
}


# --------------------------------------------------------------------------- Hugging Face


def hf_model(name: str) -> nn.Module:
    """A Hugging Face vision model built from a small config (no download), in eval mode, with
    its BatchNorms randomized like a trained net's. Needs ``transformers`` (a test extra)."""
    import transformers as T  # optional: only these tests need it

    configs = {
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
            num_labels=10)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)),
        "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.25, image_size=32, num_labels=10)),
        "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320,
            num_labels=10)),
        "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
            layer_type="y", num_labels=10)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=10)),
        # eager attention: torch 2.13's ONNX exporter cannot decompose Swin's SDPA call (the
        # original model fails to export the same way)
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4, num_labels=10, attn_implementation="eager")),
    }
    model = seeded(configs[name], 0)
    randomize_norm_(model)
    return model.eval()


HF_MODELS = ("resnet", "convnext", "mobilenet_v2", "efficientnet", "regnet", "vit", "swin")


class SmallResidualNet(nn.Module):
    """BN to fold, a residual add, a strided gated conv, pooling + linear head (export tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        x = torch.relu(self.down(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
