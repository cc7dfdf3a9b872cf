"""Small test models reproducing the graph structures of torchvision/timm/Hugging Face CNNs.

Users bring models we do not ship (EfficientNet, DenseNet, RegNet, ConvNeXt,
ShuffleNet, ...). Each class below keeps the *structural* features a compiler pass
must cope with -- squeeze-excitation multiplies, concatenations, grouped and
depthwise convs, channels-last LayerNorm/Linear, channel shuffles, chunk/split,
functional convs -- at a size (<= 64 channels, 32x32 input) that runs in
milliseconds on a CPU. All but ``Untraceable`` are ``torch.fx.symbolic_trace``-able.
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
    "LayerNorm2d",
    "SqueezeExcitation",
    "StochasticDepth",
    "TinyConvNeXt",
    "TinyDenseNet",
    "TinyEfficientNet",
    "TinyMixed",
    "TinyRegNet",
    "TinyShuffleNet",
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
        layers.append(activation(inplace=True))
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
