"""What ispc found and decided, per layer: a table for people, JSON for programs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

__all__ = ["LayerReport", "Report"]


@dataclass
class LayerReport:
    """One candidate layer (every conv2d and linear of the traced graph).

    ``kept_mean``/``kept_p10``/``kept_p90`` count input channels kept per instance on the
    calibration data; ``macs`` are the dense multiply-accumulates per instance at the calibration
    input size; ``expected_macs`` those expected after gating.
    """

    name: str
    op: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: int = 1
    macs: int | None = None
    expected_macs: float | None = None
    cv: float | None = None
    rank: int | None = None
    gated: bool = False
    reason: str | None = None
    threshold: float | None = None
    k: int | None = None
    kept_mean: float | None = None
    kept_p10: float | None = None
    kept_p90: float | None = None
    site: str | None = None
    #: the eager CPU kernel a gated layer runs (``native:pix``, ``native:co``, ``gather``, ...)
    cpu_kernel: str | None = None
    #: output channels removed because the gated layer after it keeps them for no input
    #: (``prune_dead``); ``in_pruned``: input channels this gated layer no longer reads
    out_pruned: int = 0
    in_pruned: int = 0

    @property
    def kept_fraction(self) -> float | None:
        if self.kept_mean is None or not self.in_channels:
            return None
        return self.kept_mean / self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("kernel", "stride"):
            if d[key] is not None:
                d[key] = list(d[key])
        d["kept_fraction"] = self.kept_fraction
        return d


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _macs(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


@dataclass
class Report:
    """The analysis of one model: per-layer rows, a summary, the config and plain-language notes."""

    layers: list[LayerReport] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the channel graph (networkx DiGraph) the analysis ran on; not serialized
    channel_graph: Any = field(default=None, repr=False, compare=False)

    def layer(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer named {name!r} in the report")

    @property
    def gated_layers(self) -> list[LayerReport]:
        return [row for row in self.layers if row.gated]

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"layers": [row.to_dict() for row in self.layers], "summary": dict(self.summary),
                "config": dict(self.config), "notes": list(self.notes)}

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        names = {f.name for f in dataclasses.fields(LayerReport)}
        rows = []
        for raw in d.get("layers", []):
            row = {k: v for k, v in raw.items() if k in names}
            for key in ("kernel", "stride"):
                if row.get(key) is not None:
                    row[key] = tuple(row[key])
            rows.append(LayerReport(**row))
        return cls(layers=rows, summary=dict(d.get("summary", {})), config=dict(d.get("config", {})),
                   notes=list(d.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    # --- human views ---------------------------------------------------------------------------
    _HEADERS = ["layer", "op", "in", "out", "MACs", "CV", "rank", "gated", "thr / k", "kept mean",
                "kept p10-p90", "CPU kernel", "why not"]

    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            gate = "-"
            if r.gated:
                gate = f"k={r.k}" if r.k is not None else f"{r.threshold:.3g}"
            spread = "-" if r.kept_p10 is None else f"{r.kept_p10:.0f}-{r.kept_p90:.0f}"
            kept = "-" if r.kept_mean is None else f"{r.kept_mean:.1f} ({r.kept_fraction:.0%})"
            cin = f"{r.in_channels} (-{r.in_pruned})" if r.in_pruned else r.in_channels
            cout = f"{r.out_channels} (-{r.out_pruned})" if r.out_pruned else r.out_channels
            rows.append([r.name, r.op, cin, cout, _macs(r.macs), _fmt(r.cv),
                         _fmt(r.rank), _fmt(r.gated), gate, kept, spread,
                         (r.cpu_kernel or "-") if r.gated else "-", r.reason or ""])
        return rows

    def _summary_lines(self) -> list[str]:
        s = self.summary
        lines = [
            f"mode: {s.get('mode')}  keep_ratio: {s.get('keep_ratio')}  "
            f"calibrated on: {s.get('calibration_samples', 0)} inputs",
            f"layers gated: {s.get('layers_gated')} of {s.get('layers_total')} candidates",
            f"dense MACs: {_macs(s.get('dense_macs'))}  expected MACs: {_macs(s.get('expected_macs'))}"
            + (f"  (reduction {s['mac_reduction']:.1%})" if s.get("mac_reduction") is not None else ""),
        ]
        if s.get("channels_last"):
            lines.append("feature maps: channels-last (NHWC) on the CPU")
        return lines + [f"note: {n}" for n in self.notes]

    def to_table(self, tablefmt: str = "simple") -> str:
        table = tabulate(self._rows(), headers=self._HEADERS, tablefmt=tablefmt, disable_numparse=True)
        return table + "\n\n" + "\n".join(self._summary_lines())

    def to_markdown(self) -> str:
        body = tabulate(self._rows(), headers=self._HEADERS, tablefmt="github", disable_numparse=True)
        summary = "\n".join(f"- {line}" for line in self._summary_lines())
        return f"# ispc report\n\n{summary}\n\n{body}\n"

    def __str__(self) -> str:
        return self.to_table()

    def to_dot(self) -> str:
        """The channel graph as Graphviz DOT: gated convolutions green, dense ones grey with their
        reason as tooltip, couplings (add, concat) as diamonds. Render: ``dot -Tsvg``."""
        if self.channel_graph is None:
            raise ValueError("this report carries no channel graph (reports loaded from JSON do not)")
        rows = {r.name: r for r in self.layers}
        lines = ["digraph ispc {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
                 'fontname="Helvetica", fontsize=10, fillcolor="white"];']
        for name, data in self.channel_graph.nodes(data=True):
            kind = data.get("kind", "other")
            target = data.get("target", name)
            row = rows.get(target) or rows.get(name)
            attrs = {"label": f"{target}\n{kind}"}
            if row is not None and row.gated:
                gate = f"k={row.k}" if row.k is not None else f"thr={row.threshold:.3g}"
                attrs.update(fillcolor="#b7e1b0", label=f"{target}\n{gate}, kept {row.kept_fraction:.0%}"
                             if row.kept_fraction is not None else f"{target}\n{gate}")
            elif row is not None:
                attrs.update(fillcolor="#e0e0e0", tooltip=row.reason or "")
            if kind in ("couple", "concat"):
                attrs["shape"] = "diamond"
            elif kind in ("input", "output"):
                attrs["shape"] = "ellipse"
            text = ", ".join(f'{k}="{str(v).replace(chr(34), chr(39))}"' for k, v in attrs.items())
            lines.append(f'  "{name}" [{text}];')
        for a, b in self.channel_graph.edges:
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines) + "\n"
