"""The compiled model users get back from :func:`ispc.compile`."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from .config import GatingConfig
from .data import iter_inputs
from .dense_route import runtime_only
from .errors import DataError
from .modules import GatedConv2d, GatedLinear, full_channels
from .report import Report
from .timing import default_progress

__all__ = ["CompiledModel", "DECLINED"]

_is_compiling = torch.compiler.is_compiling  # read per call: a global, not torch's attributes

#: a runner's ``serve`` answer where the compiled model's full call path must run
DECLINED = object()


class CompiledModel(nn.Module):
    """A gated model: same inputs and outputs as the original, dropped channels really skipped.

    ``graph_module`` is the rewritten :class:`torch.fx.GraphModule`; ``report`` the analysis that
    produced it; ``config`` the :class:`GatingConfig`; ``backend`` how ``forward`` runs it.

    An inference model: its parameters are frozen (``requires_grad=False``), so that a plain
    ``fast(x)`` runs the native kernels and the dense route as under ``torch.no_grad()`` (with
    parameters that need gradients every call would take PyTorch's per-layer ops, ~3x slower). An
    input that requires grad still runs PyTorch's ops, and gradients reach it;
    ``fast.graph_module.requires_grad_(True)`` gives the parameters gradients again.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, config: GatingConfig,
                 backend: str = "eager") -> None:
        super().__init__()
        graph_module.requires_grad_(False)
        self.graph_module = graph_module
        self.report = report
        self.config = config
        self.backend = backend
        self.__dict__["_runner"] = None  # a backend's compiled callable; not a registered submodule
        self.__dict__["_serve"] = None  # its short path, where it has one

    def use_runner(self, runner: Any) -> None:
        """Run ``forward`` through ``runner`` (a backend's compiled callable over
        ``graph_module``; None: the graph module itself). Not a registered submodule."""
        self.__dict__["_runner"] = runner
        self.__dict__["_serve"] = getattr(runner, "serve", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a runner's short path (NativePlanRunner.serve) where nothing changed since its last call;
        # otherwise nn.Module.__call__ (hooks, tracing) as for any module
        if len(args) == 1 and not kwargs and not _is_compiling():
            serve = self.__dict__.get("_serve")
            if serve is not None:
                out = serve(self, args[0])
                if out is not DECLINED:
                    return out
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Called as the original model is: its input positionally or by its keyword
        (``fast(x)``, ``fast(pixel_values=x)``); returns what it returns (a tensor, a tuple, a
        Hugging Face ``ModelOutput``)."""
        runner = self.__dict__["_runner"]
        if kwargs:
            kwargs = self._keywords(kwargs)
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor) and a.layout is not torch.strided:
                raise DataError(f"the compiled model takes dense (strided) tensors, got one of layout "
                                f"{a.layout} and shape {tuple(a.shape)}; pass x.to_dense()")
        return (self.graph_module if runner is None else runner)(*args, **kwargs)

    def _keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments the graph takes: its inputs by name. Arguments the model was
        captured without may be passed as None (their default: ``labels=None``); any other value
        would change what the captured graph computes, so it is refused in one line."""
        names = self.__dict__.get("_inputs")
        if names is None:
            names = self.__dict__["_inputs"] = tuple(
                n.target for n in self.graph_module.graph.nodes if n.op == "placeholder")
        extra = [k for k in kwargs if k not in names]
        if not extra:
            return kwargs
        bad = [k for k in extra if kwargs[k] is not None]
        if bad:
            raise DataError(f"the compiled model takes {', '.join(names)}; it was captured with "
                            f"the model's other arguments at their defaults, so it cannot take "
                            f"{', '.join(f'{k}={type(kwargs[k]).__name__}' for k in bad)} (compile a "
                            "module whose forward fixes them, or call it without them)")
        return {k: v for k, v in kwargs.items() if k in names}

    def gated_modules(self) -> dict[str, GatedConv2d]:
        """The gated layers by qualified name."""
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, GatedConv2d)}

    @torch.no_grad()
    def measure(self, data: Any, *, progress: bool | None = None) -> dict[str, Any]:
        """Run ``data`` and measure what the gates actually do on it.

        Returns per-layer kept-channel statistics and the MACs per input actually executed
        (conv2d and linear layers, at the sizes seen) against the dense MACs.
        """
        gm = self.graph_module
        param = next(gm.parameters(), None)
        kept: dict[str, list[Tensor]] = {n: [] for n in self.gated_modules()}
        dense = torch.zeros((), dtype=torch.float64)
        executed_parts: list[Tensor] = []
        hooks = []

        def macs_of(m: nn.Module, out: Tensor) -> int:
            if isinstance(m, GatedLinear):
                return int(out[0].numel() // m.out_channels * m.in_channels * m.out_channels)
            if isinstance(m, (nn.Conv2d, GatedConv2d)):
                w = m.weight
                cin_g = w.shape[1]
                return int(out.shape[1] * out.shape[2] * out.shape[3] * cin_g * w.shape[2] * w.shape[3])
            rows = 1
            for d in out.shape[1:-1]:
                rows *= int(d)
            return int(rows * m.in_features * m.out_features)

        def hook(m: nn.Module, args: tuple, out: Tensor, name: str) -> None:
            nonlocal dense
            per = macs_of(m, out)
            n = out.shape[0]
            if isinstance(m, (nn.Conv2d, GatedConv2d)) or hasattr(m, "ispc_full_channels"):
                # channels prune_dead removed count as dense
                fo, fi = full_channels(m)
                out_c, in_c = (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (
                    m.out_channels, m.in_channels)
                dense += per * n * (fo / out_c) * (fi / in_c)
            else:
                dense += per * n
            if isinstance(m, GatedConv2d):
                counts = m.kept_mask(args[0]).sum(1).to(torch.float64).cpu()
                kept[name].append(counts)
                executed_parts.append((counts / m.in_channels * per).sum())
            else:
                executed_parts.append(torch.tensor(float(per * n), dtype=torch.float64))

        for name, m in gm.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, GatedConv2d)):
                hooks.append(m.register_forward_hook(
                    lambda mod, a, o, name=name: hook(mod, a, o, name)))
        samples = 0
        try:
            with runtime_only(gm, False):  # a dense route's own layers run: the hooks see them
                it = iter_inputs(data, device=param.device if param is not None else None,
                                 dtype=param.dtype if param is not None else None)
                for x in tqdm(it, desc="ispc: measuring", unit="batch",
                              disable=not (progress if progress is not None else default_progress()),
                              leave=False):
                    gm(x)
                    samples += int(x.shape[0])
        finally:
            for h in hooks:
                h.remove()
        if samples == 0:
            raise DataError("measure() got no inputs; pass a non-empty iterable of batches")
        executed = float(torch.stack(executed_parts).sum()) if executed_parts else 0.0
        layers = {}
        for name, parts in kept.items():
            c = torch.cat(parts)
            cin = full_channels(self.gated_modules()[name])[1]  # of all its input channels
            layers[name] = {"kept_mean": float(c.mean()), "kept_fraction": float(c.mean()) / cin,
                            "kept_p10": float(torch.quantile(c, 0.1)),
                            "kept_p90": float(torch.quantile(c, 0.9))}
        dense_per = float(dense) / samples
        exec_per = executed / samples
        return {"samples": samples, "dense_macs": dense_per, "executed_macs": exec_per,
                "mac_reduction": 1.0 - exec_per / dense_per if dense_per else 0.0, "layers": layers}

    def extra_repr(self) -> str:
        s = self.report.summary
        return f"backend={self.backend!r}, layers_gated={s.get('layers_gated')}, mode={s.get('mode')!r}"
