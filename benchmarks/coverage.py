"""What ispc does with a model, in one row: the coverage check behind ``docs/models.md``.

    python benchmarks/coverage.py               # the standard families (tests/zoo.py) and the
                                                # Hugging Face ones (small configs), a Markdown table


:func:`check_model` compiles a model twice on its calibration data (keep 1.0 and ``keep_ratio``)
and reports: which capture ran, whether the compiled model at keep 1.0 equals the original
(relative error), how many layers are gated at ``keep_ratio`` and the expected MAC cut, whether
every gated layer equals its masked-dense reference on a held-out input, whether the report names
every convolution and linear layer the model holds, and, where ispc refuses the model, the
one-line error. The test suite runs it over the standard families (``tests/test_families.py``);
``benchmarks/coverage.py`` prints the table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ispc import GatingConfig, IspcError
from ispc import compile as ispc_compile
from ispc.modules import GatedConv2d

__all__ = ["ModelCheck", "check_model", "relative_error", "main"]


def relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over every floating tensor of two outputs of the same structure."""
    worst = 0.0
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        if isinstance(x, Tensor) and x.is_floating_point():
            if x.shape != y.shape:
                return float("inf")
            denom = float(y.abs().max()) if y.numel() else 0.0
            worst = max(worst, float((x - y).abs().max()) / max(denom, 1e-12) if x.numel() else 0.0)
    return worst


@dataclass
class ModelCheck:
    """One model's row (see the module docstring)."""

    name: str
    capture: str | None = None
    compiles: bool = False
    equal_error: float | None = None  #: keep 1.0 against the original
    layers_gated: int = 0
    layers_total: int = 0
    mac_reduction: float | None = None
    reference_error: float | None = None  #: worst gated layer against its masked-dense form
    unnamed_layers: list[str] = field(default_factory=list)  #: conv/linear modules not in the report
    refusal: str | None = None

    @property
    def equal(self) -> bool:
        return self.equal_error is not None and self.equal_error <= 1e-4

    @property
    def correct(self) -> bool:
        """Equal at keep 1.0 and every gated layer equal to its reference."""
        return self.equal and (self.reference_error is None or self.reference_error <= 1e-5)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "equal": self.equal, "correct": self.correct}


def _call(model: nn.Module, x: Tensor, key: str | None) -> Any:
    with torch.no_grad():
        return model(**{key: x}) if key else model(x)


def _reference_error(compiled, x: Tensor, key: str | None) -> float | None:
    seen: dict[str, tuple[list[Tensor], Tensor]] = {}
    gated = compiled.gated_modules()
    hooks = [m.register_forward_hook(
        lambda mod, a, o, n=n: seen.__setitem__(n, ([t.clone() for t in a], o.clone())))
        for n, m in gated.items()]
    try:
        _call(compiled, x, key)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        errs = [relative_error(o, gated[n].reference(*a)) for n, (a, o) in seen.items()]
    return max(errs) if errs else None


def check_model(name: str, model: nn.Module, calibration: list, held_out: Tensor, *,
                key: str | None = None, keep_ratio: float = 0.5,
                config: GatingConfig | None = None) -> ModelCheck:
    """Compile ``model`` at keep 1.0 and at ``keep_ratio`` and check it (module docstring).
    ``calibration``: its batches; ``held_out``: an input it was not calibrated on; ``key``: the
    keyword the model takes its input by (``pixel_values``), None for positional."""
    cfg = (config or GatingConfig()).replace(keep_ratio=1.0)
    row = ModelCheck(name)
    model = model.eval()
    try:
        full = ispc_compile(model, calibration, config=cfg, progress=False)
        gated = ispc_compile(model, calibration, config=cfg.replace(keep_ratio=keep_ratio),
                             progress=False)
    except IspcError as exc:
        row.refusal = f"{type(exc).__name__}: {exc}"
        return row
    row.compiles = True
    row.capture = full.report.summary.get("capture")
    row.equal_error = relative_error(_call(full, held_out, key), _call(model, held_out, key))
    s = gated.report.summary
    row.layers_gated, row.layers_total = s["layers_gated"], s["layers_total"]
    row.mac_reduction = s["mac_reduction"]
    row.reference_error = _reference_error(gated, held_out, key)
    names = {r.name for r in gated.report.layers}
    row.unnamed_layers = [p for p, m in model.named_modules()
                          if isinstance(m, (nn.Conv2d, nn.Linear, GatedConv2d)) and p not in names
                          and not any(n.startswith(p + ":") for n in names)]
    return row


def table(rows: list[ModelCheck]) -> str:
    """The Markdown coverage table."""
    lines = ["| family | capture | compiles | equal at keep 1.0 (rel. err.) | gated layers | "
             "expected MAC cut | gated layers = reference | refusal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.capture or '-'} | {'yes' if r.compiles else 'no'} | "
            + (f"{'yes' if r.equal else 'NO'} ({r.equal_error:.1e})" if r.equal_error is not None
               else "-")
            + f" | {r.layers_gated} of {r.layers_total} | "
            + (f"{r.mac_reduction:.0%}" if r.mac_reduction is not None else "-")
            + f" | {'-' if r.reference_error is None else ('yes' if r.reference_error <= 1e-5 else 'NO')}"
            + f" | {r.refusal or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from pathlib import Path

    p = argparse.ArgumentParser(description="ispc's coverage of the standard model families")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face models")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import zoo  # the test structures (tests/zoo.py)

    torch.set_num_threads(1)
    cal = [zoo.example_input(8, 32, seed=2)]
    held = zoo.example_input(4, 32, seed=3)
    cfg = GatingConfig(min_channels=8)
    rows = [check_model(name, factory(), cal, held, keep_ratio=args.keep_ratio, config=cfg)
            for name, factory in zoo.FAMILIES.items()]
    if args.hf:
        for name in zoo.HF_MODELS:
            rows.append(check_model(f"{name} (Hugging Face)", zoo.hf_model(name),
                                    [{"pixel_values": cal[0]}], held, key="pixel_values",
                                    keep_ratio=args.keep_ratio, config=cfg))
    print(table(rows))
    ok = sum(r.correct for r in rows)
    print(f"\n{ok} of {len(rows)} compile and equal the original at keep 1.0 with every gated layer "
          "equal to its reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
