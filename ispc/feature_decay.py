"""Feature decay: the instance-wise l2,1 regularizer of Liu et al. (IJCAI 2019).

Added to the training loss while fine-tuning, it pushes whole channels of each instance's feature
maps toward zero, which is what later lets ispc skip those channels per input:

    R = weight * sum_l mean_n sum_c ||F^l[n, c]||_2     (l2 over spatial positions)

It regularizes the *input* of the chosen layers because the input of a convolution is what ispc
gates. The value is built by forward pre-hooks during the model's own forward pass, so the
training loop only adds ``decay.value()`` to its loss.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from torch.nn.parallel import DistributedDataParallel

from .config import GatingConfig
from .errors import ConfigError, TraceError
from .pipeline import site_names

__all__ = ["FeatureDecay", "default_sites", "feature_decay_term", "training_module"]


def default_sites(model: nn.Module, config: Any = None) -> list[str]:
    """Names of the modules whose inputs are regularized by default: the gating candidates
    ``ispc.compile`` would consider (same tracing and site discovery, structural rules only:
    ``groups=1`` convolutions with zero padding and at least ``config.min_channels`` inputs).

    A model torch.fx cannot trace falls back to every such ``nn.Conv2d`` found by module type.
    """
    cfg = config or GatingConfig()
    try:
        return site_names(model, cfg)
    except TraceError:
        return [name for name, m in model.named_modules()
                if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
                and m.in_channels >= cfg.min_channels]


def feature_decay_term(x: torch.Tensor) -> torch.Tensor:
    """``mean_n sum_c ||x[n, c]||_2`` for one ``N x C x ...`` feature map, computed in float32.

    ``vector_norm`` rather than ``sqrt(sum(x**2))``: its gradient is defined (zero) for an
    all-zero channel, which ReLU outputs produce all the time.
    """
    if x.dim() < 2:
        raise ConfigError(f"feature decay needs an N x C x ... feature map, got shape {tuple(x.shape)}")
    norms = torch.linalg.vector_norm(x.reshape(x.shape[0], x.shape[1], -1), ord=2, dim=2,
                                     dtype=torch.float32)
    return norms.sum(dim=1).mean()


def training_module(model: nn.Module) -> nn.Module:
    """The module that actually runs in training: DistributedDataParallel keeps it as ``.module``."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class FeatureDecay:
    """Records the feature-decay regularizer of a model's forward passes.

    ``layers`` names the modules whose *inputs* are regularized (names as in
    ``model.named_modules()``; for a DistributedDataParallel model, names of ``model.module``);
    ``None`` means :func:`default_sites`. Recording happens only while the model is in training
    mode with autograd enabled, unless ``always=True``. Each forward of the model starts a new
    record, so :meth:`value` is the regularizer of the last forward pass.

    Usable as a context manager; :meth:`remove` detaches the hooks for good.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float,
        *,
        layers: Iterable[str] | None = None,
        always: bool = False,
    ) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"feature decay weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.always = bool(always)
        self._root = training_module(model)
        self.layers: list[str] = self._resolve(self._root, layers)
        self._terms: list[torch.Tensor] = []
        self._handles: list[Any] = []
        modules = dict(self._root.named_modules())
        # The root hook starts a new record per forward; it is registered first so it runs first.
        self._handles.append(self._root.register_forward_pre_hook(self._on_model_forward))
        for name in self.layers:
            self._handles.append(modules[name].register_forward_pre_hook(self._on_layer_input))

    @staticmethod
    def _resolve(root: nn.Module, layers: Iterable[str] | None) -> list[str]:
        if layers is None:
            names = default_sites(root)
            if not names:
                raise ConfigError(
                    "the model has no nn.Conv2d with groups == 1 and >= 16 input channels to "
                    "regularize; pass layers=[...] with the names of the modules to use"
                )
            return names
        if isinstance(layers, str):
            raise ConfigError(f"layers must be a list of module names, got the string {layers!r}")
        known = {name for name, _ in root.named_modules() if name}
        out: list[str] = []
        for name in layers:
            if name not in known and name.startswith("module.") and name[len("module."):] in known:
                name = name[len("module."):]  # a name copied from a DDP model's named_modules()
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=5)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ConfigError(f"no module named {name!r} in the model{hint}")
            if name not in out:
                out.append(name)
        if not out:
            raise ConfigError("layers is empty; pass None for the default sites or at least one module name")
        return out

    # -- hooks ---------------------------------------------------------------------------------------

    def _recording(self) -> bool:
        return self.always or (self._root.training and torch.is_grad_enabled())

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._terms = []

    def _on_layer_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and self._recording():
            self._terms.append(feature_decay_term(args[0]))

    # -- public --------------------------------------------------------------------------------------

    def value(self) -> torch.Tensor:
        """``weight * sum of the terms`` of the last forward pass; a zero tensor if none was recorded."""
        if not self._terms:
            p = next(self._root.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return self.weight * torch.stack(self._terms).sum()

    def reset(self) -> None:
        """Forget the recorded terms (and the autograd graph they hold)."""
        self._terms = []

    def remove(self) -> None:
        """Detach every hook; the model then runs exactly as without feature decay."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached."""
        return bool(self._handles)

    def __enter__(self) -> "FeatureDecay":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureDecay(weight={self.weight}, layers={len(self.layers)}, active={self.active})"
