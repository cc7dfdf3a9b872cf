"""What the passes hand each other: typed records in ``node.meta["ispc"]``.

Each FX node carries one :class:`NodeRecords` (:func:`records` creates it on first use). Its fields
are frozen records, each created by one pass and read by the passes after it and by the report
(:func:`ispc.pipeline.build_report`) and the archive (:mod:`ispc.serialization`); a later pass
that revises one replaces it whole (``dataclasses.replace``), so there is one truth per fact.
Module attributes that mirror a record (a gated layer's threshold and k, its kernel) are set
*from* the record (:func:`ispc.passes.base.apply_gate`, :func:`ispc.passes.base.apply_kernel`).

=============  ======================  ==================================================
field          written by              read by
=============  ======================  ==================================================
channel_kind   find_sites              find_sites (channel graph)
layer          find_sites              calibrate, rank, baselines, report
stats          calibrate               rank, baselines, examples/cifar single-layer check
gate           rank; refine and        insert_gates, report, baselines
               select_kernels revise
kernel         select_kernels; load    report, serialization
pruning        prune_dead; baselines   report
folded_bn      fold_bn                 (the record of what was folded)
linear         linear_as_conv          (the record of what was rewritten)
lowered        lower_pools             tests
layout         channels_last           (marks the input converter)
epilogue       fuse_epilogues          (the record of what was fused)
sums           hand_sums               tests (the record of what was linked)
=============  ======================  ==================================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .observers import SaliencyStats

__all__ = ["LayerFacts", "GateDecision", "KernelChoice", "Pruning", "Epilogue", "LinearAsConv",
           "SumsHandoff", "NodeRecords", "records", "KEY"]

#: the ``node.meta`` key the records live under
KEY = "ispc"


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerFacts:
    """A conv2d or linear node's shape facts, and whether it may be gated (find_sites)."""

    name: str  #: the module's qualified name (a functional conv: the node's name)
    op: str  #: ``conv2d``, ``conv2d (functional)`` or ``linear``
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: int = 1
    macs: int | None = None  #: dense multiply-accumulates per instance at the calibration size
    reason: str | None = None  #: why it cannot be gated; None: a candidate
    site: str | None = None  #: how its input is coupled (residual add, concat, shared)
    site_node: str | None = None  #: the node whose output it reads

    @property
    def candidate(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True, kw_only=True)
class GateDecision:
    """Whether a candidate layer is gated, its rank and budget (rank); refine re-chooses the
    threshold and kept counts on the gated graph, select_kernels may leave the layer dense."""

    gated: bool
    reason: str | None = None  #: why not gated
    cv: float | None = None  #: coefficient of variation of its channel saliency across inputs
    rank: int | None = None  #: 1 = highest CV
    threshold: float | None = None  #: threshold mode
    k: int | None = None  #: topk mode
    kept_mean: float | None = None  #: input channels kept per instance on the calibration data
    kept_p10: float | None = None
    kept_p90: float | None = None

    def with_kept(self, counts: torch.Tensor, **changes: Any) -> GateDecision:
        """This decision with ``changes`` and the kept-count statistics of ``counts`` (one count
        per calibration instance)."""
        return dataclasses.replace(self, kept_mean=float(counts.mean()),
                                   kept_p10=float(torch.quantile(counts, 0.1)),
                                   kept_p90=float(torch.quantile(counts, 0.9)), **changes)

    def ungated(self, reason: str) -> GateDecision:
        """The same layer left dense, for ``reason`` (its CV and rank stay)."""
        return dataclasses.replace(self, gated=False, reason=reason, threshold=None, k=None,
                                   kept_mean=None, kept_p10=None, kept_p90=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelChoice:
    """The eager CPU kernel a gated layer runs, and how it was chosen (select_kernels)."""

    strategy: str  #: a name in ``ispc.ops.cpu_kernels.STRATEGIES``
    orient: str | None = None  #: the native kernel's orientation (``pix``, ``co``, ``cl``, ``full``)
    #: ``predicted``, ``measured``, ``measured_whole_model`` (dense_kernels) or ``archive`` (ispc.load)
    cost_model: str = "predicted"
    times_ms: dict[str, float] | None = None  #: measured: every candidate's median, and dense
    batch_size: int | None = None  #: measured at this batch size
    input_layout: str | None = None  #: ``channels_last`` when timed on a channels-last input
    runs_on: str | None = None  #: ``cuda``: timed on the GPU (the strategy is the CPU's)
    #: ``nhwc`` on a 3x3 stride-1 layer: Winograd (True) or direct (False), both timed; None:
    #: ``ispc.ops.native.winograd_chosen``'s rule decides where the model runs
    winograd: bool | None = None

    @property
    def label(self) -> str:
        """``strategy``, ``strategy:orient`` or ``strategy:winograd``/``:direct`` (timed), as the
        report prints it."""
        algo = "" if self.winograd is None else (":winograd" if self.winograd else ":direct")
        return self.strategy + (f":{self.orient}" if self.orient else "") + algo


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruning:
    """Channels removed statically (prune_dead; the static baseline's producers)."""

    in_channels: int = 0  #: input channels this gated layer no longer reads
    out_channels: int = 0  #: output channels removed: no gated layer after it reads them


@dataclass(frozen=True, slots=True, kw_only=True)
class Epilogue:
    """What fuse_epilogues folded into a gated layer or a max-pool."""

    residual: bool = False
    act: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SumsHandoff:
    """Saliency sums handed between native layers (hand_sums): the kind (``l2``/``l1``) this
    layer computes for its output, and the layer whose sums of its input it reads."""

    out_kind: str | None = None
    reads_from: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearAsConv:
    """A linear layer rewritten as the convolution whose kernel covers its input map."""

    in_features: int
    channels: int
    kernel: tuple[int, int]


@dataclass(slots=True)
class NodeRecords:
    """Every record of one node (see the module docstring for who writes and reads which)."""

    channel_kind: str | None = None
    layer: LayerFacts | None = None
    stats: SaliencyStats | None = None
    gate: GateDecision | None = None
    kernel: KernelChoice | None = None
    pruning: Pruning = Pruning()
    folded_bn: str | None = None
    linear: LinearAsConv | None = None
    lowered: str | None = None
    layout: str | None = None
    epilogue: Epilogue | None = None
    sums: SumsHandoff | None = None

    def copy(self) -> NodeRecords:
        """A shallow copy (the records themselves are immutable), for a node that replaces this
        one."""
        return dataclasses.replace(self)


def records(node: fx.Node) -> NodeRecords:
    """The records of ``node`` (created empty on first use)."""
    rec = node.meta.get(KEY)
    if not isinstance(rec, NodeRecords):
        rec = node.meta[KEY] = NodeRecords()
    return rec
