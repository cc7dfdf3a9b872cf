"""The one settings object of a compilation: :class:`GatingConfig`.

Frozen and keyword-only so that a config can be shared, hashed and logged, and every field is
validated on construction: a wrong value fails where it was written, not deep inside a pass.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .errors import ConfigError, OptionError

__all__ = ["GatingConfig", "MODES", "SALIENCIES", "ALLOCATIONS", "CAPTURES", "DENSE_ROUTES",
           "checked_options"]

MODES = ("threshold", "topk")
SALIENCIES = ("l2", "l1", "weighted_l2")
ALLOCATIONS = ("layer", "global")
CAPTURES = ("auto", "fx", "export")
DENSE_ROUTES = ("auto", "off", "onnxruntime", "openvino")


def _check_number(name: str, value: Any, *, lo: float, hi: float, lo_open: bool, hi_open: bool = False,
                  integer: bool = False) -> None:
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"GatingConfig.{name} must be {kind}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"GatingConfig.{name} is NaN; give a number in the documented range")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"GatingConfig.{name}={value!r} is outside {lb}{lo}, {hi}{rb}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"GatingConfig.{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _layer_keep_ratios(value: Any) -> tuple[tuple[str, float], ...]:
    """``layer_keep_ratios`` as the frozen form: a tuple of ``(pattern, ratio)`` pairs, in order."""
    fix = "e.g. {'layer3.*': 0.4, 'layer3.2.conv2': 0.8}"
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (tuple, list)) and all(
            isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ConfigError("GatingConfig.layer_keep_ratios must map layer-name patterns (fnmatch) to "
                          f"keep ratios, {fix}; got {value!r}")
    seen: set[str] = set()
    out = []
    for pattern, ratio in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"GatingConfig.layer_keep_ratios has the pattern {pattern!r}; patterns "
                              f"are non-empty layer-name strings (fnmatch), {fix}")
        if pattern in seen:
            raise ConfigError(f"GatingConfig.layer_keep_ratios names the pattern {pattern!r} twice; "
                              "give each pattern once")
        seen.add(pattern)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
                or not 0.0 < ratio <= 1.0:
            raise ConfigError(f"GatingConfig.layer_keep_ratios[{pattern!r}]={ratio!r} is not a keep "
                              "ratio in (0, 1] (1.0 leaves the layer dense)")
        out.append((pattern, float(ratio)))
    return tuple(out)


def _check_patterns(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"GatingConfig.{name} must be a tuple of layer-name patterns (fnmatch), "
                          f"e.g. ('layer1.*',), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GatingConfig:
    """How ispc gates a model. Every option is keyword-only; ``replace(**changes)`` derives a new one.

    Attributes:
        keep_ratio: average fraction of a gated layer's input channels kept, measured on the
            calibration data; 1.0 keeps every channel (the compiled model equals the original).
        mode: ``"threshold"`` drops, per input, the channels whose saliency falls below a per-layer
            threshold (the number kept varies per input: the paper's dynamic sparsity); ``"topk"``
            keeps a fixed number k per layer, chosen per input (static shapes for compiled backends).
        saliency: per-instance channel importance. ``"l2"`` is the paper's l2 norm (as a root mean
            square over spatial positions, so thresholds carry across input sizes); ``"l1"`` the mean
            absolute value; ``"weighted_l2"`` the l2 norm times the norm of the channel's weights in the
            gated convolution (what the channel can contribute to the output).
        allocation: how ``keep_ratio`` is spread over the gated layers. ``"layer"``: every gated
            layer keeps ``keep_ratio`` of its input channels on average. ``"global"``: one cut across
            the network on saliency divided by each layer's mean saliency, placed so that the gated
            layers together keep ``keep_ratio`` of their MACs; layers whose channels are often
            negligible give up more (feature decay concentrates sparsity unevenly, so a uniform
            ratio over-prunes some layers and under-prunes others). Needs calibration data.
        min_cv: layers whose coefficient of variation of channel saliency across inputs is below
            this stay dense (their channel usage hardly changes per input: static pruning would do).
        gate_fraction: gate only this fraction of the eligible layers, the ones with the highest CV.
        min_channels: convolutions with fewer input channels stay dense (e.g. the RGB stem).
        channel_multiple: in topk mode, round k up to a multiple of this (SIMD-friendly widths).
        include: if given, only layers whose name matches one of these fnmatch patterns are gated.
        exclude: layers whose name matches one of these fnmatch patterns are never gated.
        max_calibration_samples: per-instance saliency rows kept per layer for choosing thresholds
            (the per-channel moments behind the CV are exact over all data regardless).
        calibration_rounds: threshold mode: how many times thresholds are re-chosen with the gates
            in place (upstream gating shifts what later layers see); 0 keeps the dense-model ones.
        latency_aware: time each gated layer's kernels and its dense conv on this machine at
            compile time; use the fastest kernel and leave a layer dense unless gating saves at
            least ``min_gain`` of its time (never slower than dense; results depend on the machine).
            Off: a deterministic shape-based cost model picks kernels and every selected layer is
            gated.
        min_gain: fraction of a layer's dense time gating must save to be kept (latency_aware).
        latency_batch_size: batch size the latency-aware cost model measures at.
        latency_rounds: interleaved timing rounds per kernel in the latency-aware cost model.
        fuse_epilogues: fold the ReLU/ReLU6 and the residual add that follow a gated layer into
            its native CPU kernel's output stores (no pass over memory of their own). Exact: the
            same additions and clamps, in the same order. On by default since the channel-lane
            kernel writes its tiles with vector stores: at batch 1, 300-round A/B runs (2-core AMD
            EPYC) gave ResNet-50 1.026-1.030x of unfused, MobileNetV2 1.022-1.026x, ResNet-18 1.00x.
        hand_sums: where a gated channels-last layer reads a map that a native layer (gated, or
            an ungated one on ispc's kernels) writes, that layer computes the map's saliency sums
            in its epilogue and hands them over, so the gated layer selects without a pass of its
            own over its input (``passes/hand_sums.py``). The same selection (tested). On by
            default since the layers run in one native program (no Python per pair): MobileNetV2
            at batch 1 ~3% faster, ResNets unchanged (docs/benchmarks.md).
        gate_linear: also gate the input features of ``nn.Linear`` layers that read a flattened
            feature map (VGG's classifier) or a plain feature vector, as the equivalent convolution
            whose kernel covers the map (``passes/linear_as_conv.py``). At batch 1 a large classifier
            is memory-bound, and the skipped channels are weights never read: VGG-16's 25088->4096
            layer reads ~400 MB per image. Off by default: it gates the layer closest to the logits
            (and needs calibration data for the input shapes).
        prune_dead: remove the input channels a gated layer keeps for no calibration input, and the
            same output channels of the convolution that computes them where nothing else reads
            them (``passes/prune_dead.py``): static pruning of what never varies, so the producer
            skips them too. Needs at least 100 calibration inputs; never at ``keep_ratio=1.0``.
        channels_last: run the compiled model's feature maps channels-last (NHWC) on the CPU,
            from its inputs on (outputs come back contiguous): oneDNN convolves the gathered
            channels of large maps faster in that layout (VGG-16 at batch 1: 4% faster in all,
            its 3-channel stem 1.9x), while the native kernel reads NCHW maps (a layer on it
            converts its input). ``None``: measured with ``latency_aware`` (the whole-model check
            times gated and dense in both layouts; the result is never slower than dense in
            either), otherwise off. ``True``/``False``: always on/off. Never on CUDA.
        layer_keep_ratios: per-layer keep ratios that replace ``keep_ratio`` (and ``allocation``)
            for the layers they name: a mapping of layer-name patterns (fnmatch, as ``include``)
            to keep ratios in (0, 1], e.g. ``{"layer3.*": 0.4, "layer3.2.conv2": 0.8}``; where
            several patterns match a layer, the last one wins. 1.0 leaves the layer dense. Which
            layers may be gated is still decided by the other options; a pattern that matches no
            gateable layer is an error at compile time. ``ispc.tune`` writes one entry per layer.
            Stored as a tuple of ``(pattern, ratio)`` pairs (hashable); a dict is accepted.
        leaf_modules: module classes that torch.fx must not trace into (for untraceable blocks).
        capture: how the model becomes a graph. ``"fx"``: ``torch.fx`` symbolic tracing;
            ``"export"``: ``torch.export`` on the first calibration batch (batch dimension dynamic
            where the model allows), lifted back to the model's own modules; ``"auto"``: fx where
            it traces and runs, else export (what most Hugging Face models need).
        dense_route: where no gate pays, run the user's dense model in the fastest installed dense
            runtime instead (``passes/dense_route.py``, docs/dense_route.md): ``"auto"`` takes it
            where the compile leaves no layer gated, and with ``latency_aware`` where that runtime,
            timed at ``latency_batch_size``, beats the gated model as built; it considers ONNX
            Runtime and OpenVINO (float32), whichever are installed. ``"onnxruntime"`` or
            ``"openvino"``: the same rule with that runtime only (an error where it is not
            installed). ``"off"``: never. CPU, float32 models with one tensor input and output.
        route_spinning: the route's ONNX Runtime workers keep spinning after a call (ONNX
            Runtime's own default, what a user deploying it gets: calls back to back run fastest).
            ``False`` stops them when a call returns, for a process that runs other torch work
            right after each call (the spinning workers take cores from it); it slows the route
            on small models by a machine-dependent amount (docs/dense_route.md).
    """

    # ``metadata["help"]`` is the one-line help the command line shows (``ispc.cli`` builds its
    # options from these fields: names, defaults, types, ``metadata["choices"]``); ``cli=False``
    # keeps a field off it.
    keep_ratio: float = field(default=0.5, metadata={
        "help": "average fraction of a gated layer's input channels kept"})
    mode: str = field(default="threshold", metadata={
        "help": "threshold: kept count varies per input; topk: fixed k per layer", "choices": MODES})
    saliency: str = field(default="l2", metadata={
        "help": "per-instance channel importance", "choices": SALIENCIES})
    allocation: str = field(default="layer", metadata={
        "help": "keep ratio per layer, or one network-wide cut over the gated layers' MACs",
        "choices": ALLOCATIONS})
    min_cv: float = field(default=0.0, metadata={
        "help": "leave layers whose CV of channel saliency is below this dense"})
    gate_fraction: float = field(default=1.0, metadata={
        "help": "gate only this fraction of eligible layers, highest CV first"})
    min_channels: int = field(default=16, metadata={
        "help": "leave convolutions with fewer input channels dense"})
    channel_multiple: int = field(default=1, metadata={
        "help": "topk: round k up to a multiple of this"})
    include: tuple[str, ...] | None = field(default=None, metadata={
        "help": "only layers matching these fnmatch patterns are considered"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "layers matching these fnmatch patterns are never gated"})
    max_calibration_samples: int = field(default=4096, metadata={
        "help": "per-instance saliency rows kept per layer for choosing thresholds"})
    calibration_rounds: int = field(default=2, metadata={
        "help": "threshold mode: re-choose thresholds this many times with the gates in place"})
    latency_aware: bool = field(default=False, metadata={
        "help": "time kernels at compile time, keep layers dense where gating does not pay"})
    min_gain: float = field(default=0.05, metadata={
        "help": "fraction of a layer's dense time gating must save (latency_aware)"})
    latency_batch_size: int = field(default=1, metadata={
        "help": "batch size the latency-aware selection times at"})
    latency_rounds: int = field(default=15, metadata={
        "help": "interleaved timing rounds per kernel (latency_aware)"})
    fuse_epilogues: bool = field(default=True, metadata={
        "help": "fold the residual add and ReLU/ReLU6 after a gated layer into its kernel"})
    hand_sums: bool = field(default=True, metadata={
        "help": "native layers hand their output's saliency sums to the gated layers reading it"})
    gate_linear: bool = field(default=False, metadata={
        "help": "also gate linear layers on a flattened feature map or a vector (the classifier)"})
    prune_dead: bool = field(default=True, metadata={
        "help": "remove channels no calibration input keeps, from the producing layer too"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "run the feature maps channels-last on the CPU (auto: measured when latency_aware)"})
    layer_keep_ratios: tuple[tuple[str, float], ...] = field(default=(), metadata={
        "cli": False, "help": "per-layer keep ratios: layer-name pattern -> ratio (last match wins)"})
    leaf_modules: tuple[type, ...] = field(default=(), metadata={"cli": False})
    capture: str = field(default="auto", metadata={
        "help": "fx: torch.fx tracing; export: torch.export; auto: fx where it works, else export",
        "choices": CAPTURES})
    dense_route: str = field(default="auto", metadata={
        "help": "run the dense model in the fastest installed dense runtime where no gate pays",
        "choices": DENSE_ROUTES})
    route_spinning: bool = field(default=True, metadata={
        "help": "the dense route's ONNX Runtime workers spin between calls (its default)"})

    def __post_init__(self) -> None:
        _check_number("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True)
        _check_choice("mode", self.mode, MODES)
        _check_choice("saliency", self.saliency, SALIENCIES)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_number("min_cv", self.min_cv, lo=0.0, hi=math.inf, lo_open=False, hi_open=True)
        _check_number("gate_fraction", self.gate_fraction, lo=0.0, hi=1.0, lo_open=False)
        _check_number("min_channels", self.min_channels, lo=1, hi=1 << 30, lo_open=False, integer=True)
        _check_number("channel_multiple", self.channel_multiple, lo=1, hi=1 << 16, lo_open=False, integer=True)
        _check_patterns("include", self.include)
        _check_patterns("exclude", self.exclude)
        _check_number("max_calibration_samples", self.max_calibration_samples, lo=1, hi=1 << 30,
                      lo_open=False, integer=True)
        _check_number("calibration_rounds", self.calibration_rounds, lo=0, hi=100, lo_open=False,
                      integer=True)
        if not isinstance(self.latency_aware, bool):
            raise ConfigError(f"GatingConfig.latency_aware must be True or False, got {self.latency_aware!r}")
        _check_number("min_gain", self.min_gain, lo=0.0, hi=1.0, lo_open=False, hi_open=True)
        _check_number("latency_batch_size", self.latency_batch_size, lo=1, hi=1 << 16, lo_open=False,
                      integer=True)
        _check_number("latency_rounds", self.latency_rounds, lo=1, hi=10_000, lo_open=False,
                      integer=True)
        if not isinstance(self.fuse_epilogues, bool):
            raise ConfigError("GatingConfig.fuse_epilogues must be True or False, "
                              f"got {self.fuse_epilogues!r}")
        if not isinstance(self.hand_sums, bool):
            raise ConfigError(f"GatingConfig.hand_sums must be True or False, got {self.hand_sums!r}")
        if not isinstance(self.prune_dead, bool):
            raise ConfigError(f"GatingConfig.prune_dead must be True or False, got {self.prune_dead!r}")
        if not isinstance(self.gate_linear, bool):
            raise ConfigError(f"GatingConfig.gate_linear must be True or False, got {self.gate_linear!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ConfigError("GatingConfig.channels_last must be True, False or None (measured "
                              f"with latency_aware), got {self.channels_last!r}")
        _check_choice("capture", self.capture, CAPTURES)
        _check_choice("dense_route", self.dense_route, DENSE_ROUTES)
        if not isinstance(self.route_spinning, bool):
            raise ConfigError("GatingConfig.route_spinning must be True or False, "
                              f"got {self.route_spinning!r}")
        object.__setattr__(self, "layer_keep_ratios", _layer_keep_ratios(self.layer_keep_ratios))
        if not isinstance(self.leaf_modules, tuple) or not all(
                isinstance(t, type) for t in self.leaf_modules):
            raise ConfigError("GatingConfig.leaf_modules must be a tuple of nn.Module classes, "
                              f"got {self.leaf_modules!r}")

    def layer_keep_ratio(self, name: str) -> float | None:
        """The keep ratio ``layer_keep_ratios`` gives layer ``name`` (the last matching pattern's),
        or None where no pattern matches it."""
        ratio = None
        for pattern, r in self.layer_keep_ratios:
            if fnmatch.fnmatchcase(name, pattern):
                ratio = r
        return ratio

    @property
    def keeps_everything(self) -> bool:
        """True when every layer keeps all its channels (``keep_ratio=1.0`` and no per-layer ratio
        below it): the compiled model computes what the original does."""
        return self.keep_ratio >= 1.0 and all(r >= 1.0 for _, r in self.layer_keep_ratios)

    def replace(self, **changes: Any) -> "GatingConfig":
        """A copy with ``changes`` applied (validated like a new config)."""
        _check_names("GatingConfig.replace()", changes, _FIELDS)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (leaf module classes by qualified name)."""
        d = dataclasses.asdict(self)
        d["leaf_modules"] = [f"{t.__module__}.{t.__qualname__}" for t in self.leaf_modules]
        d["include"] = list(self.include) if self.include is not None else None
        d["exclude"] = list(self.exclude)
        d["layer_keep_ratios"] = dict(self.layer_keep_ratios)
        return d


_FIELDS = tuple(f.name for f in dataclasses.fields(GatingConfig))


def _unknown(owner: str, name: str, valid: tuple[str, ...]) -> OptionError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}=...?" if close else f"its options: {', '.join(valid)}"
    return OptionError(f"{owner} has no option {name!r}; {hint}")


def _check_names(owner: str, given: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for name in given:
        if name not in valid:
            raise _unknown(owner, name, valid)


def _gating_config_init(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass ``__init__`` with Python's TypeErrors for a misspelt keyword or a positional
    option turned into a one-line :class:`OptionError` that names the fix."""

    @functools.wraps(init)
    def __init__(self: GatingConfig, *args: Any, **options: Any) -> None:
        if args:
            raise OptionError(f"GatingConfig takes keyword options only, e.g. "
                              f"GatingConfig(keep_ratio={args[0]!r}); got {len(args)} by position")
        _check_names("GatingConfig", options, _FIELDS)
        init(self, **options)

    return __init__


GatingConfig.__init__ = _gating_config_init(GatingConfig.__init__)  # type: ignore[method-assign]

_F = TypeVar("_F", bound=Callable[..., Any])


def checked_options(fn: _F) -> _F:
    """``fn`` (an entry point taking ``config=``) with an unknown keyword, or more positional
    arguments than it takes, raised as a one-line :class:`OptionError` that names the fix: a
    :class:`GatingConfig` option given to ``fn`` itself is shown going into ``config=``."""
    params = inspect.signature(fn).parameters.values()
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
    owner = f"ispc.{fn.__name__}()"

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise OptionError(f"{owner} takes {len(positional)} arguments by position "
                              f"({', '.join(positional)}), got {len(args)}; pass the rest by "
                              f"keyword, e.g. config=ispc.GatingConfig(keep_ratio=0.5)")
        for name in kwargs:
            if name in named:
                continue
            if name in _FIELDS:
                raise OptionError(f"{owner} has no option {name!r}: it is a GatingConfig option; "
                                  f"pass config=ispc.GatingConfig({name}=...)")
            raise _unknown(owner, name, named)
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]
