"""Gate-aware fine-tuning: train the original model with a compiled model's gates in its forward.

A network fine-tuned with feature decay learns to leave channels near zero, but ispc then drops
every channel under its calibrated threshold, including the small-but-not-zero ones the network
still relied on. Fine-tuning with the gates in the loop lets it adapt to exactly the channels it
will be given. :class:`GateMasks` attaches forward pre-hooks to the gated convolutions of the
*original* model (before BatchNorm folding, so the model stays trainable as usual) that multiply
each instance's input by the keep mask the compiled layer computes at inference
(:meth:`ispc.GatedConv2d.kept_mask`): the masked-dense form that every ispc kernel equals. The mask
is constant in the backward pass (straight-through), so gradients reach only the kept channels, as
at inference. Compile again afterwards: the thresholds are re-calibrated on the adapted model.

    compiled = ispc.compile(model, calibration, config=GatingConfig(keep_ratio=0.55, allocation="global"))
    with ispc.GateMasks(model, compiled):
        ...  # train as usual; every forward of model sees ispc's gates
"""
from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .compiled import CompiledModel
from .errors import ConfigError
from .feature_decay import training_module
from .modules import MODE_CODES, SALIENCY_CODES, GatedLinear, full_channels
from .ops.linear_kernels import as_map
from .ops import gated_conv as _gc

__all__ = ["GateMasks"]


class GateMasks:
    """Apply ``compiled``'s gates to the matching layers of ``model`` on every forward pass.

    Layers are matched by qualified name (a DistributedDataParallel model's ``.module`` names);
    a compiled model without gates is refused. ``enabled`` turns the masks off without removing
    the hooks; :meth:`remove` detaches them for good. Usable as a context manager.
    """

    def __init__(self, model: nn.Module, compiled: CompiledModel) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"GateMasks needs the nn.Module to train, got {type(model).__name__}")
        if not isinstance(compiled, CompiledModel):
            raise ConfigError("GateMasks needs the model returned by ispc.compile(model, ...), "
                              f"got {type(compiled).__name__}")
        gates = compiled.gated_modules()
        if not gates:
            raise ConfigError("the compiled model has no gated layers: nothing to train with "
                              "(see its report for why each layer stayed dense)")
        modules = dict(training_module(model).named_modules())
        missing = sorted(set(gates) - set(modules))
        if missing:
            raise ConfigError(f"layers {missing[:5]} of the compiled model are not in this model; "
                              "compile this same model (names must match)")
        self.enabled = True
        #: per layer: (scale on CPU, mode, threshold, k, saliency) -- the gate's decision rule only
        self.gates = {name: (g.scale.detach().clone(), MODE_CODES[g.mode], float(g.threshold),
                             int(g.k), SALIENCY_CODES[g.saliency]) for name, g in gates.items()}
        #: per layer: which original input channels the compiled layer still reads (None: all;
        #: passes/prune_dead.py removes those no input keeps: they are always masked here), and
        #: how many it had
        self.index = {name: None if g.in_index is None else g.in_index.detach().cpu().clone()
                      for name, g in gates.items()}
        self.full_in = {name: full_channels(g)[1] for name, g in gates.items()}
        #: the gated linear layers over an N x ... x C input's last dimension
        self.linear = {name for name, g in gates.items() if isinstance(g, GatedLinear)}
        self._scales: dict[tuple[str, torch.device], Tensor] = {}
        self._hooks = [modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: self._mask(name, args)) for name in self.gates]

    @property
    def layers(self) -> list[str]:
        """The masked layers' names."""
        return list(self.gates)

    def mask(self, name: str, x: Tensor) -> Tensor:
        """The keep mask (bool, N x C) the compiled layer ``name`` computes for input ``x``."""
        scale, mode, threshold, k, saliency = self.gates[name]
        key = (name, x.device)
        if key not in self._scales:
            self._scales[key] = scale.to(x.device)
        index = self.index[name]
        with torch.no_grad():
            if index is None:
                return _gc.channel_mask(x.detach(), self._scales[key], mode, threshold, k, saliency)
            index = index.to(x.device)
            full = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            full[:, index] = _gc.channel_mask(x.detach()[:, index], self._scales[key], mode,
                                              threshold, k, saliency)
            return full

    def _mask(self, name: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.enabled or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if name in self.linear:  # channels on the last dimension, positions/tokens before it
            if x.dim() < 2 or x.shape[-1] != self.full_in[name]:
                return None
            m = self.mask(name, as_map(x))
            m = m.reshape(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
            return (x * m.to(x.dtype), *args[1:])
        if x.dim() == 2:  # a gated linear layer (gate_linear): C channels of H*W features each
            c = self.full_in[name]
            if x.shape[1] % c:
                return None
            m = self.mask(name, x.reshape(x.shape[0], c, -1, 1))
            return (x * m.repeat_interleave(x.shape[1] // c, dim=1).to(x.dtype), *args[1:])
        if x.dim() != 4:
            return None
        m = self.mask(name, x)
        return (x * m[:, :, None, None].to(x.dtype), *args[1:])

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> GateMasks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
