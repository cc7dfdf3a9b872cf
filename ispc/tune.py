"""The fastest compiled model within an accuracy budget: :func:`tune`.

A user has a trained model, a metric on their own validation data and a limit ("at most half a
point of top-1"). ``tune`` searches a keep ratio per layer and returns the compiled model with the
fewest MACs (``target="macs"``) or the lowest measured latency (``target="latency"``) among those
whose metric stays within the limit. The metric is the expensive part (a pass over the user's
validation data), so the search spends it sparingly and does the rest on the calibration data:

1. one compile up to the gates, at the loosest setting (every candidate layer gated, keeping every
   channel); its calibration statistics are all later steps need: a layer's threshold or k for
   any keep ratio is read off its saliency sample, and a candidate allocation is applied in place
   (the gates' records and modules), never compiled from scratch;
2. per-layer sensitivity, one layer gated at a time at each keep ratio of a grid: how far the
   model's outputs move on calibration inputs (no labels needed: for a classifier the KL
   divergence of its predictions from the dense model's, else a normalized squared error);
3. each layer's cost at each ratio: MACs (prune_dead's removals included), or, for latency, its
   kernels timed by the latency-aware cost model (:mod:`ispc.passes.kernel_costs`) at a few kept
   fractions (ratios where gating would not save ``min_gain`` are not searched);
4. a greedy path from dense: the next move is the layer (and ratio) with the least output error
   per MAC or millisecond saved (ties: larger saving, higher CV first), so layers whose channels
   are often negligible give up channels first;
5. a bisection along that path with the metric (a handful of evaluations), then a greedy
   refinement around the best point found: single-layer steps ranked by the error they add to
   the current model, each checked with the metric and rolled back when it breaks the budget
   (the layer then frozen, or, after a narrow miss, taking half steps between grid points).

Every evaluated candidate is the model ``ispc.compile(model, data, config=candidate_config)``
builds (the rest of the compile pipeline runs on a copy of the search graph), so the returned
model's config reproduces it. ``static=True`` runs the same search for static pruning
(:func:`ispc.static_prune`: one channel set per layer for every input), the baseline dynamic
gating is compared with. A ``cache`` file makes a search resumable: metric values and
sensitivities are kept there and replayed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from .backends import get_backend
from .baselines import StaticConv2d, kept_count, static_channels, static_prune
from .compiled import CompiledModel
from .config import GatingConfig, checked_options
from .data import as_input
from .errors import ConfigError, DataError
from .modules import GatedConv2d, dense_conv
from .passes import PassState, records, run_passes
from .passes.base import apply_gate, apply_kernel, replace_submodule
from .passes.channels_last import runs_channels_last
from .passes.kernel_costs import (input_hw, layer_inputs, measure, predicted_choice,
                                  time_candidates)
from .passes.prune_dead import MIN_SAMPLES, producer_of
from .passes.rank import choose_k, choose_threshold, kept_counts, rank_layers
from .passes.refine import refine_rounds
from .pipeline import COMPILE, build_report, check_config, dense_graph, new_state, private_copy, unwrap
from .records import KEY
from .timing import default_progress, time_interleaved

__all__ = ["tune", "top1", "TuneReport", "Trial", "TARGETS", "GRID", "clock"]

TARGETS = ("latency", "macs")
#: the keep ratios each layer is searched over (only those giving a distinct threshold or k)
GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(20))
#: calibration inputs the output-error proxy runs on
PROXY_INPUTS = 256
#: a layer's sensitivity curve stops once its error exceeds this (its output is noise by then)
PROXY_CAP = 1.0
#: the bisection along the greedy path stops when its bracket spans less than this fraction of
#: the dense cost
BISECT_TOL = 0.005
#: the refinement stops after this many steps in a row broke the budget (near the budget's edge
#: the metric's noise decides most single steps)
MAX_ROLLBACKS = 6
#: a refinement step that misses the budget by less than this fraction of ``max_drop`` is tried
#: again in half steps (between two grid points) instead of freezing its layer
NARROW = 0.25
#: interleaved rounds each evaluated candidate is timed in, against the dense model
LATENCY_ROUNDS = 20
#: kept fractions each layer's kernels are timed at (target="latency")
TIMED_FRACTIONS = (0.25, 0.5, 0.75)
#: distinct inputs a latency measurement cycles through
LATENCY_INPUTS = 16
CACHE_FORMAT, CACHE_VERSION = "ispc-tune-cache", 2
#: the passes of ``ispc.compile`` the search graph runs (up to the gates, before the first refine)
#: and those each evaluated candidate runs on its copy (after it)
HEAD = COMPILE[:COMPILE.index("refine")]
TAIL = COMPILE[COMPILE.index("refine") + 1:]
#: the clock the time budget is read from (tests replace it)
clock: Callable[[], float] = time.monotonic


class _OutOfTime(Exception):
    """The time budget would be exceeded by the next step."""


# --------------------------------------------------------------------------------------------------
# The metric helper
# --------------------------------------------------------------------------------------------------

def top1(loader: Iterable[Any], *, per_sample: bool = False) -> Callable[[nn.Module], Any]:
    """A metric for :func:`tune`: top-1 accuracy **in percent** (so ``max_drop=0.5`` is half a point)
    of a model over ``loader``'s ``(inputs, labels)`` batches (a DataLoader, or a list of tuples).
    The loader is read once per evaluation, so it must be re-iterable (not a generator).

    ``per_sample=True`` returns each sample's score instead (100 if correct, else 0; their mean is
    the top-1): with it :func:`tune` knows how noisy each comparison with the dense model is and
    keeps a margin for that noise (``confidence``)."""
    if isinstance(loader, (str, bytes, Tensor)) or not isinstance(loader, Iterable):
        raise DataError(f"top1 needs an iterable of (inputs, labels) batches, got "
                        f"{type(loader).__name__}; pass a DataLoader or a list of (x, y) tuples")
    if iter(loader) is loader:
        raise DataError("top1 got an iterator, which is empty after one evaluation; pass a "
                        "re-iterable: a DataLoader or a list of (x, y) tuples")

    @torch.no_grad()
    def metric(model: nn.Module) -> Any:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None and p.is_floating_point() else None
        correct = count = 0
        hits: list[Tensor] = []
        for i, batch in enumerate(loader):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2
                    and isinstance(batch[1], Tensor)):
                raise DataError(f"top1: batch {i} is a {type(batch).__name__}, not (inputs, labels); "
                                "pass a loader of (x, y) batches with integer class labels")
            x = as_input(batch, i, device=device, dtype=dtype)
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = batch[1].to(out.device).flatten()
            hit = out.argmax(-1).flatten() == y
            hits.append(hit.cpu())
            correct += int(hit.sum())
            count += int(y.numel())
        if count == 0:
            raise DataError("top1: the loader yielded no labelled samples")
        if per_sample:
            return 100.0 * torch.cat(hits).double()
        return 100.0 * correct / count

    metric.__name__ = metric.__qualname__ = "top1"
    return metric


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

@dataclass
class Trial:
    """One configuration the search evaluated with the metric."""

    index: int
    phase: str  #: ``dense``, ``path`` (bisection along the greedy path) or ``greedy`` (refinement)
    ratios: dict[str, float]  #: keep ratio of every searched layer below 1.0
    metric: float | None
    feasible: bool | None  #: within the budget
    mac_reduction: float | None  #: MACs executed on the calibration data, against dense
    latency_ms: float | None  #: measured, median of interleaved rounds at ``latency_batch_size``
    dense_latency_ms: float | None  #: the dense model in the same rounds
    proxy: float | None = None  #: output error on the calibration inputs (the search's estimate)
    #: what the metric must clear the floor by: ``z * se`` of its paired difference from the dense
    #: model (per-sample scores only; 0 otherwise)
    margin: float = 0.0
    seconds: float = 0.0  #: what evaluating it took (compile rest, metric, timing)
    cached: bool = False  #: the metric came from the cache file
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.latency_ms and self.dense_latency_ms:
            return self.dense_latency_ms / self.latency_ms
        return None


@dataclass
class TuneReport:
    """What :func:`tune` tried and why it chose what it returned (``to_table``, ``to_json``)."""

    target: str
    mode: str  #: the gating mode, or ``static``
    dense_metric: float
    max_drop: float
    relative: bool
    floor: float  #: the lowest metric within the budget
    #: one-sided confidence that a result is within the budget (per-sample scores), else None
    confidence: float | None
    trials: list[Trial]
    chosen: int  #: index of the returned trial
    why: str
    stopped: str | None  #: why the search stopped early (time budget), or None
    seconds: float  #: this run of the search
    evaluations: int  #: calls of the metric (the dense model's included; cached ones not)
    config: dict[str, Any]  #: the returned model's GatingConfig (``to_dict``)
    keep_fractions: dict[str, float] | None  #: static: what ``ispc.static_prune`` takes
    layers: list[dict[str, Any]]  #: per searched layer: CV, MACs, chosen ratio, sensitivity curve
    notes: list[str] = field(default_factory=list)
    #: earlier runs of the same search (same cache file) that a time budget stopped: their seconds
    #: and metric evaluations
    earlier_runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> Trial:
        return self.trials[self.chosen]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["best"] = dataclasses.asdict(self.best)
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def to_table(self, tablefmt: str = "simple") -> str:
        rows = []
        for t in self.trials:
            rows.append([
                t.index, t.phase, len(t.ratios),
                f"{100 * t.mac_reduction:.1f}%" if t.mac_reduction is not None else "-",
                f"{t.latency_ms:.3f}" if t.latency_ms is not None else "-",
                f"{t.speedup:.2f}x" if t.speedup is not None else "-",
                f"{t.metric:.4g}" if t.metric is not None else "-",
                f"{t.metric - self.dense_metric:+.3g}" if t.metric is not None else "-",
                f"{t.margin:.3g}" if t.margin else "-",
                {True: "yes", False: "no", None: "-"}[t.feasible] + (" *" if t.index == self.chosen else ""),
                t.note])
        head = (f"ispc.tune ({self.mode}, target {self.target}): dense metric {self.dense_metric:.4g}, "
                f"budget >= {self.floor:.4g} (max_drop {self.max_drop:g}"
                f"{' relative' if self.relative else ''}"
                + (f", metric - margin, one-sided {self.confidence:g} confidence"
                   if self.confidence is not None else "")
                + f"); {len(self.trials)} configurations, "
                f"{self.evaluations} metric evaluations, {self.seconds:.0f} s"
                + (f" (and {len(self.earlier_runs)} earlier run(s) stopped by a time budget: "
                   f"{sum(r['seconds'] for r in self.earlier_runs):.0f} s, "
                   f"{sum(r['evaluations'] for r in self.earlier_runs)} evaluations)"
                   if self.earlier_runs else ""))
        table = tabulate(rows, headers=["#", "phase", "layers cut", "MAC cut", "ms", "speed-up",
                                        "metric", "vs dense", "margin", "in budget",
                                        "step"],
                         tablefmt=tablefmt, disable_numparse=True)
        tail = [f"chosen: #{self.chosen}: {self.why}"]
        if self.stopped:
            tail.append(f"stopped early: {self.stopped}")
        return "\n".join([head, table, *tail, *self.notes])

    def __str__(self) -> str:
        return self.to_table()


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------

@dataclass
class _Layer:
    """A searched layer and everything the search knows about it."""

    name: str  #: the layer's name (what ``layer_keep_ratios`` matches)
    target: str  #: its module's path in the search graph
    node: fx.Node
    module: GatedConv2d
    original: nn.Module  #: the (BatchNorm-folded) layer before gating
    channels: int
    out_channels: int
    macs: float
    cv: float
    ratios: list[float]  #: keep ratios searched, descending, ``ratios[0] == 1.0``
    settings: list[float | int]  #: threshold (threshold mode) or k per ratio, on the dense sample
    kept: list[float]  #: kept fraction of its input channels on the calibration sample, per ratio
    dead: list[int]  #: channels no calibration input keeps, per ratio (what prune_dead removes)
    producer: str | None = None  #: the layer that computes its input channels for it alone
    consumer: str | None = None  #: the searched layer it computes the input of alone
    proxy: list[float] = field(default_factory=list)  #: sensitivity (output error) per ratio
    ms: list[float] | None = None  #: estimated time per ratio (target="latency")
    allowed: list[bool] = field(default_factory=list)  #: ratios the search may use
    mask: Tensor | None = None  #: static: the input-channel mask now applied
    #: per ratio: on :data:`GRID` (True) or a half step between two grid points (False), which
    #: only the refinement takes and whose sensitivity is interpolated, not measured
    coarse: list[bool] = field(default_factory=list)

    def setting_for(self, ratio: float, mode: str, multiple: int, sample: Tensor | None) -> float | int:
        if mode == "threshold":
            return choose_threshold(sample, ratio) if sample is not None else self.settings[
                self.ratios.index(ratio)]
        if mode == "topk":
            return choose_k(self.channels, ratio, multiple)
        return kept_count(ratio, self.channels)


def _leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out.detach().float()] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return []


def _on_grid(lay: _Layer, values: list[Any]) -> list[Any]:
    """``values`` (one per ratio of ``lay``) at its :data:`GRID` points only."""
    return [v for v, on in zip(values, lay.coarse) if on]


def _expand(lay: _Layer, curve: list[float]) -> None:
    """Set ``lay.proxy`` from its sensitivity at the grid points: a half step's is the mean of its
    neighbours' (it is not measured)."""
    it = iter(curve)
    proxy = [next(it) if on else math.nan for on in lay.coarse]
    for i, on in enumerate(lay.coarse):
        if not on:
            proxy[i] = (proxy[i - 1] + proxy[i + 1]) / 2
    lay.proxy = proxy


class _Search:
    def __init__(self, model: nn.Module, data: list[Any], evaluate: Callable[[nn.Module], float], *,
                 base: GatingConfig, max_drop: float, relative: bool, target: str, static: bool,
                 seed: int, progress: bool, time_budget_s: float | None,
                 max_evaluations: int | None, cache: Path | None, confidence: float) -> None:
        self.model, self.data, self.user_evaluate = model, data, evaluate
        self.confidence = confidence
        self.z = statistics.NormalDist().inv_cdf(confidence)
        self.dense_scores: Tensor | None = None  # the dense model's per-sample scores, if given
        self.base, self.max_drop, self.relative = base, max_drop, relative
        self.target, self.static, self.seed, self.progress = target, static, seed, progress
        self.max_evaluations = max_evaluations
        self.start = clock()
        self.deadline = self.start + time_budget_s if time_budget_s is not None else math.inf
        self.cache_path = cache
        self.trials: list[Trial] = []
        self.by_key: dict[str, Trial] = {}
        self.models: dict[int, CompiledModel] = {}  # the best feasible trial's model (and dense)
        self.evaluations = 0
        self.eval_seconds: list[float] = []
        self.step_seconds: list[float] = []  # what evaluating a candidate took, all in
        self.trial_idx: dict[int, dict[str, int]] = {}  # trial -> its allocation (grid indices)
        self.refined: frozenset[str] | None = None
        self.stopped: str | None = None
        self.notes: list[str] = []
        self.mode = "static" if static else base.mode

    # ---- set-up ----------------------------------------------------------------------------

    def build(self) -> None:
        """The search graph: ``ispc.compile``'s passes up to the gates, every candidate gated and
        keeping every channel; the searched layers and their grids."""
        cfg = self.base.replace(keep_ratio=1.0, allocation="layer", prune_dead=False,
                                fuse_epilogues=False, latency_aware=False, layer_keep_ratios=())
        self.search_cfg = cfg
        work = private_copy(unwrap(self.model))
        state = new_state(work, self.data, cfg, self.progress)
        upto = HEAD.index("rank") + 1
        gm = run_passes(work, state, HEAD[:upto])
        originals = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
                     if records(n).gate is not None and records(n).gate.gated}
        self.gm = run_passes(gm, state, HEAD[upto:])
        self.state = state
        if not state.calibrated:
            raise DataError("ispc.tune: calibration_data yielded no inputs")
        self.cache_inputs = state.calibration_cache
        seen = sum(int(x.shape[0]) for x in self.cache_inputs)
        # static pruning always removes what it drops from the producer; prune_dead what no input keeps
        self.prunes = self.static or (self.base.prune_dead and seen >= MIN_SAMPLES)
        self.layers: dict[str, _Layer] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_module" or node.target not in originals:
                continue
            mod = self.gm.get_submodule(node.target)
            if not isinstance(mod, GatedConv2d):
                continue
            rec = records(node)
            apply_kernel(node, predicted_choice(mod, node), mod)  # fast proxies; values unchanged
            self.layers[node.target] = self._layer(node, mod, originals[node.target], rec)
        if self.prunes:
            for lay in self.layers.values():
                prod = producer_of(self.gm, lay.node)
                if prod is not None:
                    lay.producer = prod.target
                    if prod.target in self.layers:
                        self.layers[prod.target].consumer = lay.target
        # what producers that are not searched cost (their MACs, output channels)
        self.facts = {n.target: records(n).layer for n in self.gm.graph.nodes
                      if n.op == "call_module" and records(n).layer is not None}
        self.dense_macs = float(sum(f.macs or 0 for f in self.facts.values()))
        # proxy inputs: a seeded sample of the cached calibration inputs
        pool = torch.cat(self.cache_inputs)
        g = torch.Generator().manual_seed(self.seed)
        take = torch.randperm(pool.shape[0], generator=g)[:PROXY_INPUTS].sort().values
        self.proxy_x = list(pool[take].split(64))
        # latency: distinct batches of latency_batch_size calibration inputs, cycled (as ispc.benchmark)
        bs = self.base.latency_batch_size
        reps = -(-bs * LATENCY_INPUTS // pool.shape[0])
        cycled = pool.repeat(reps, *([1] * (pool.dim() - 1))) if reps > 1 else pool
        self.latency_pool = list(cycled[:bs * LATENCY_INPUTS].split(bs))
        if self.static:
            for lay in self.layers.values():
                lay.module.register_forward_pre_hook(
                    lambda m, args, lay=lay: args if lay.mask is None else
                    (args[0] * lay.mask.to(args[0]).view(1, -1, 1, 1), *args[1:]))
        with torch.no_grad():
            self.y0 = [_leaves(self.gm(x)) for x in self.proxy_x]
        # a classifier's logits (one N x K output): how far its predicted distribution moves (KL);
        # anything else: the squared error, relative to the outputs' spread
        self.classifier = all(len(ys) == 1 and ys[0].dim() == 2 and ys[0].shape[1] > 1 for ys in self.y0)
        if self.classifier:
            self.y0 = [[torch.log_softmax(ys[0], 1)] for ys in self.y0]
            self.y0_scale = float(sum(ys[0].shape[0] for ys in self.y0))
        else:
            centred = sum(float(((t - t.mean(0, keepdim=True)) ** 2).sum()) for ys in self.y0 for t in ys)
            self.y0_scale = centred or sum(float((t ** 2).sum()) for ys in self.y0 for t in ys) or 1.0

    def _layer(self, node: fx.Node, mod: GatedConv2d, original: nn.Module, rec: Any) -> _Layer:
        stats, facts = rec.stats, rec.layer
        sample = stats.sample
        c = int(mod.in_channels)

        def point(r: float) -> tuple[float, float | int]:
            if self.static:
                s: float | int = kept_count(r, c)
                return (1.0 if s == c else s / c), s
            if self.base.mode == "topk":
                s = choose_k(c, r, self.base.channel_multiple)
                return (1.0 if s == c else s / c), s
            return r, choose_threshold(sample, r)

        grid: list[tuple[float, float | int]] = []
        for r in GRID:
            ratio, s = point(r)
            if not grid or s != grid[-1][1]:
                grid.append((ratio, s))
        # half steps between neighbouring grid points, for the refinement only (no sensitivity)
        points: list[tuple[float, float | int, bool]] = []
        for i, (ratio, s) in enumerate(grid):
            points.append((ratio, s, True))
            if i + 1 < len(grid):
                half, hs = point(round((ratio + grid[i + 1][0]) / 2, 6))
                if hs != s and hs != grid[i + 1][1] and grid[i + 1][0] < half < ratio:
                    points.append((half, hs, False))
        ratios, settings, kept, dead, coarse = [], [], [], [], []
        for ratio, s, on_grid in points:
            ratios.append(ratio)
            settings.append(s)
            coarse.append(on_grid)
            if self.static or self.base.mode == "topk":
                kept.append(s / c)
                if ratio >= 1.0:
                    dead.append(0)
                elif self.static:
                    dead.append(c - int(s))
                else:
                    top = torch.topk(sample, int(s), dim=1).indices if sample.numel() else None
                    used = torch.zeros(c, dtype=torch.bool)
                    if top is not None:
                        used[top.flatten()] = True
                    dead.append(int((~used).sum()))
            else:
                kept.append(float(kept_counts(sample, "threshold", s, 0).mean()) / c if sample.numel() else 1.0)
                dead.append(int(((sample >= s).sum(0) == 0).sum()) if s > 0 and sample.numel() else 0)
        return _Layer(name=facts.name, target=node.target, node=node, module=mod, original=original,
                      channels=c, out_channels=int(facts.out_channels), macs=float(facts.macs or 0),
                      cv=float(rec.gate.cv or 0.0), ratios=ratios, settings=settings, kept=kept,
                      dead=dead, allowed=[True] * len(ratios), coarse=coarse)

    # ---- budget, clock, cache --------------------------------------------------------------

    def floor(self, dense: float) -> float:
        return dense - self.max_drop * (abs(dense) if self.relative else 1.0)

    def check_time(self, next_step_s: float) -> None:
        if clock() + next_step_s > self.deadline:
            raise _OutOfTime

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        def raw(t: Tensor) -> bytes:
            return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()

        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            if isinstance(t, Tensor):
                h.update(raw(t))
        for x in self.cache_inputs:
            h.update(raw(x))
        h.update(str(self.state.calibration_samples).encode())
        return h.hexdigest()

    def load_cache(self) -> None:
        self.cache: dict[str, Any] = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                      "fingerprint": self.fingerprint(), "metrics": {},
                                      "se": {}, "dense_scores": None, "sensitivity": {}, "runs": {}}
        if self.cache_path is None or not self.cache_path.exists():
            return
        try:
            old = json.loads(self.cache_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ispc.tune: cannot read the cache file {str(self.cache_path)!r} "
                              f"({exc}); delete it or pass another path") from None
        if not isinstance(old, dict) or old.get("format") != CACHE_FORMAT or \
                old.get("version") != CACHE_VERSION:
            raise ConfigError(f"ispc.tune: {str(self.cache_path)!r} is not a tune cache of this "
                              "version; delete it or pass another path")
        if old.get("fingerprint") != self.cache["fingerprint"]:
            raise ConfigError(f"ispc.tune: the cache file {str(self.cache_path)!r} was written for "
                              "another model or other calibration data; delete it or pass another "
                              "path")
        self.cache["metrics"] = dict(old.get("metrics") or {})
        self.cache["se"] = dict(old.get("se") or {})
        self.cache["dense_scores"] = old.get("dense_scores")
        if self.cache["dense_scores"] is not None:
            self.dense_scores = torch.tensor(self.cache["dense_scores"], dtype=torch.float64)
        self.cache["sensitivity"] = dict(old.get("sensitivity") or {})
        self.cache["runs"] = dict(old.get("runs") or {})

    def save_cache(self) -> None:
        if self.cache_path is None:
            return
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
        tmp.write_text(json.dumps(self.cache, indent=1, allow_nan=False))
        os.replace(tmp, self.cache_path)

    # ---- the metric ------------------------------------------------------------------------

    def metric(self, model: nn.Module, key: str) -> tuple[float, float, bool]:
        """The user's metric of ``model`` (or its cached value for ``key``), the margin it must
        clear the floor by, and whether it was cached."""
        if key in self.cache["metrics"]:
            se = self.cache["se"].get(key)
            return float(self.cache["metrics"][key]), self.z * se if se else 0.0, True
        if self.max_evaluations is not None and self.evaluations >= self.max_evaluations:
            raise _OutOfTime("max_evaluations")
        t0 = clock()
        model.eval()
        value = self.user_evaluate(model)
        self.eval_seconds.append(clock() - t0)
        self.evaluations += 1
        scores = None
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        elif (isinstance(value, Tensor) and value.dim() == 1
              and (value.is_floating_point() or value.dtype == torch.bool)
              and bool(torch.isfinite(value.double()).all())):
            scores = value.detach().cpu().double()
            value = float(scores.mean())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"ispc.tune: evaluate(model) returned {value!r}; it must return a finite "
                            "number or a 1-D tensor of finite per-sample scores, higher is better "
                            "(e.g. ispc.tune.top1(val_loader))")
        se = self._paired_se(scores, key)
        self.cache["metrics"][key] = float(value)
        if se is not None:
            self.cache["se"][key] = se
        self.save_cache()
        return float(value), self.z * se if se else 0.0, False

    def _paired_se(self, scores: Tensor | None, key: str) -> float | None:
        """The standard error of the mean per-sample difference from the dense model (None without
        per-sample scores); the dense model's own scores are kept for that."""
        if key == "dense":
            self.dense_scores = scores
            self.cache["dense_scores"] = scores.tolist() if scores is not None else None
            return None
        if (scores is None) != (self.dense_scores is None):
            raise DataError("ispc.tune: evaluate(model) returned per-sample scores for one model and "
                            "a single number for another; return the same kind every call")
        if scores is None:
            return None
        if scores.shape != self.dense_scores.shape:
            raise DataError(f"ispc.tune: evaluate(model) returned {scores.numel()} per-sample scores, "
                            f"the dense model's call {self.dense_scores.numel()}; score the same "
                            "samples in the same order every call")
        n = scores.numel()
        return float((self.dense_scores - scores).std() / math.sqrt(n)) if n > 1 else 0.0

    # ---- applying an allocation in place -----------------------------------------------------

    def set_layer(self, lay: _Layer, setting: float | int | None) -> None:
        """Gate one layer of the search graph at ``setting`` (threshold, k, or static k); None
        keeps every channel."""
        m = lay.module
        if self.static:
            m.threshold, m.k = 0.0, m.in_channels
            if setting is None or int(setting) >= lay.channels:
                lay.mask = None
            else:
                mask = torch.zeros(lay.channels)
                mask[static_channels(records(lay.node).stats, int(setting))] = 1.0
                lay.mask = mask
        elif self.base.mode == "threshold":
            m.threshold = float(setting) if setting is not None else 0.0
        else:
            m.k = int(setting) if setting is not None else m.in_channels

    def proxy(self) -> float:
        """Output error of the search graph as it is set now, on the proxy inputs: the KL
        divergence of a classifier's predictions from the dense model's (per input), else the
        squared error relative to the dense outputs' spread."""
        err = 0.0
        with torch.no_grad():
            for x, ys in zip(self.proxy_x, self.y0):
                out = _leaves(self.gm(x))
                if self.classifier:
                    logp = torch.log_softmax(out[0], 1)
                    err += float((ys[0].exp() * (ys[0] - logp)).sum())
                else:
                    err += sum(float(((t - t0) ** 2).sum()) for t, t0 in zip(out, ys))
        return err / self.y0_scale

    def config_for(self, idx: dict[str, int]) -> GatingConfig:
        ratios = tuple((lay.name, lay.ratios[idx[t]]) for t, lay in self.layers.items())
        return self.base.replace(
            keep_ratio=1.0, layer_keep_ratios=ratios,
            latency_aware=True if self.target == "latency" else self.base.latency_aware)

    def fractions_for(self, idx: dict[str, int]) -> dict[str, float]:
        return {lay.name: lay.ratios[idx[t]] for t, lay in self.layers.items() if idx[t] > 0}

    def key_for(self, idx: dict[str, int]) -> str:
        if self.static:
            return json.dumps({"static": self.fractions_for(idx),
                               "config": self.search_cfg.replace(latency_aware=False).to_dict()},
                              sort_keys=True)
        return json.dumps(self.config_for(idx).to_dict(), sort_keys=True)

    def realize(self, idx: dict[str, int]) -> tuple[GatingConfig | None, list[str], dict[str, Tensor]]:
        """Set the search graph to allocation ``idx`` exactly as ``ispc.compile`` would before its
        first refine: gates from ``rank`` on the cached statistics, then ``refine``'s rounds.
        Returns the config, rank's notes and refine's last samples (name -> rows)."""
        if self.static:
            for t, lay in self.layers.items():
                self.set_layer(lay, lay.settings[idx[t]] if idx[t] > 0 else None)
            self.refined = None
            return None, [], {}
        cfg = self.config_for(idx)
        st = PassState(config=cfg, progress=False, example_inputs=self.state.example_inputs,
                       calibration_samples=self.state.calibration_samples,
                       calibration_cache=self.cache_inputs)
        rank_layers(self.gm, st)
        gated = {}
        for t, lay in self.layers.items():
            gate = records(lay.node).gate
            if gate.gated:
                apply_gate(lay.node, gate, lay.module)
                gated[t] = lay.node
            else:
                self.set_layer(lay, None)
        samples: dict[str, Tensor] = {}
        self.refined = None  # as the refine pass decides whether it runs
        if cfg.mode == "threshold" and gated and not cfg.keeps_everything and self.cache_inputs:
            samples = refine_rounds(self.gm, gated, cfg, self.cache_inputs)
            self.refined = frozenset(gated)
        return cfg, st.notes, samples

    def compile_candidate(self, idx: dict[str, int], cfg: GatingConfig | None,
                          notes: list[str]) -> CompiledModel:
        """The model ``ispc.compile`` (or ``ispc.static_prune``) builds for allocation ``idx``: the
        rest of the pipeline on a copy of the search graph as :meth:`realize` left it."""
        if self.static:
            fractions = self.fractions_for(idx)
            return static_prune(self.model, self.data, keep_fractions=fractions,
                                config=self.search_cfg, progress=False).eval()
        gm = copy.deepcopy(self.gm)
        for node in gm.graph.nodes:  # deepcopy shares node.meta's values: records of its own
            rec = node.meta.get(KEY)
            if rec is not None:
                node.meta[KEY] = rec.copy()
        for t in self.layers:
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == t)
            if not records(node).gate.gated:  # insert_gates would have left it as it was
                replace_submodule(gm, t, copy.deepcopy(self.layers[t].original))
        st = PassState(config=cfg, progress=False, example_inputs=self.state.example_inputs,
                       calibration_samples=self.state.calibration_samples,
                       calibration_cache=self.cache_inputs, notes=list(self.state.notes) + notes,
                       channel_graph=self.state.channel_graph, refined_gates=self.refined)
        if self.refined is not None:
            st.notes.append(f"thresholds refined over {cfg.calibration_rounds} round(s) with the "
                            f"gates in place, on {sum(int(x.shape[0]) for x in self.cache_inputs)} "
                            "cached calibration inputs")
        gm = run_passes(gm, st, TAIL)
        compiled = CompiledModel(gm, build_report(gm, st), cfg, backend="eager")
        get_backend("eager").attach(compiled, st.example_inputs)
        return compiled.eval()

    def _dense_model(self) -> CompiledModel:
        """The all-dense candidate (every layer keeps every channel)."""
        idx = {t: 0 for t in self.layers}
        cfg, notes, _ = self.realize(idx)
        return self.compile_candidate(idx, cfg, notes)

    # ---- costs -------------------------------------------------------------------------------

    def cost(self, idx: dict[str, int]) -> float:
        """Estimated MACs (or milliseconds) of allocation ``idx`` on the calibration data."""
        total = self.dense_ms if self.target == "latency" else self.dense_macs
        for t, lay in self.layers.items():
            total += self._own(lay, idx[t]) * self._out_factor(lay, idx) - self._own(lay, 0)
            if lay.producer is not None and lay.producer not in self.layers:
                full, out = self._producer_cost(lay, idx)
                total -= full * lay.dead[idx[t]] / max(out, 1)
        return total

    def _own(self, lay: _Layer, i: int) -> float:
        return lay.ms[i] if self.target == "latency" else lay.macs * lay.kept[i]

    def _out_factor(self, lay: _Layer, idx: dict[str, int]) -> float:
        if lay.consumer is None:
            return 1.0
        c = self.layers[lay.consumer]
        return 1.0 - c.dead[idx[c.target]] / max(lay.out_channels, 1)

    def _producer_cost(self, lay: _Layer, idx: dict[str, int]) -> tuple[float, int]:
        """The full cost of ``lay``'s producer at its current setting, and its output channels."""
        p = self.layers.get(lay.producer)
        if p is not None:
            return self._own(p, idx[p.target]), p.out_channels
        facts = self.facts[lay.producer]
        if self.target == "latency":
            return float(facts.macs or 0) * self.ms_per_mac, facts.out_channels
        return float(facts.macs or 0), facts.out_channels

    def _saving(self, lay: _Layer, i: int, j: int, idx: dict[str, int]) -> float:
        """What moving ``lay`` from ratio index ``i`` to ``j`` saves, the others at ``idx``."""
        s = (self._own(lay, i) - self._own(lay, j)) * self._out_factor(lay, idx)
        if lay.producer is not None:
            full, out = self._producer_cost(lay, idx)
            s += full * (lay.dead[j] - lay.dead[i]) / max(out, 1)
        return s

    def time_layers(self) -> None:
        """Each searched layer's time at each ratio: its kernels (or its static convolution) timed
        on its real input at a few kept fractions, interpolated; dense at ratio 1.0. Ratios where
        the layer would not save ``min_gain`` of its dense time are not searched (latency-aware
        compilation would leave the layer dense there)."""
        x = self.latency_pool[0]
        inputs = layer_inputs(self.gm, list(self.layers), x)
        cfg = self.search_cfg.replace(latency_aware=True)
        total_dense = total_macs = 0.0
        bar = tqdm(self.layers.values(), desc="ispc tune: timing layers", disable=not self.progress,
                   leave=False)
        for lay in bar:
            xin = inputs.get(lay.target)
            if xin is None:
                lay.ms = [0.0] * len(lay.ratios)
                continue
            sample = records(lay.node).stats.sample
            points: list[tuple[float, float]] = []
            t_dense = None
            strategy = (lay.module.strategy, lay.module.orient)
            algorithm = lay.module.winograd
            for frac in TIMED_FRACTIONS:
                if self.static:
                    k = kept_count(frac, lay.channels)
                    conv = lay.module
                    static = StaticConv2d(conv.weight, conv.bias, static_channels(records(lay.node).stats, k),
                                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
                    plain = dense_conv(conv, input_hw(lay.node))
                    with torch.no_grad():
                        times = time_candidates({"dense": lambda: plain(xin), "static": lambda: static(xin)},
                                                cfg.latency_rounds)
                    points.append((k / lay.channels, times["static"]))
                else:
                    setting = lay.setting_for(frac, self.base.mode, self.base.channel_multiple, sample)
                    self.set_layer(lay, setting)
                    m = measure(lay.module, xin, lay.node, cfg)
                    gated = min(v for k2, v in m.times.items() if k2 != "dense")
                    kept = float(lay.module.kept_mask(xin).float().mean())
                    points.append((kept, gated))
                    times = m.times
                t_dense = times["dense"] if t_dense is None else min(t_dense, times["dense"])
            self.set_layer(lay, None)
            lay.module.set_strategy(*strategy, winograd=algorithm)
            points.sort()
            xs = np.array([p[0] for p in points])
            ys = np.array([p[1] for p in points])
            slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if xs[-1] > xs[0] else 0.0

            def at(kf: float) -> float:
                if kf < xs[0]:
                    return max(0.0, ys[0] - slope * (xs[0] - kf))
                if kf > xs[-1]:
                    return ys[-1] + slope * (kf - xs[-1])
                return float(np.interp(kf, xs, ys))

            lay.ms = [t_dense if i == 0 else at(kf) for i, kf in enumerate(lay.kept)]
            lay.allowed = [i == 0 or ms <= t_dense * (1.0 - self.base.min_gain)
                           for i, ms in enumerate(lay.ms)]
            total_dense += t_dense
            total_macs += lay.macs
        self.ms_per_mac = total_dense / total_macs if total_macs else 0.0
        self.dense_ms = sum(lay.ms[0] for lay in self.layers.values()) + sum(
            float(f.macs or 0) * self.ms_per_mac for t, f in self.facts.items() if t not in self.layers)

    # ---- measuring a candidate ---------------------------------------------------------------

    def latency(self, model: nn.Module) -> tuple[float, float]:
        """Median ms of ``model`` and of the dense model, interleaved, at ``latency_batch_size``."""
        nhwc = runs_channels_last(model.graph_module) if isinstance(model, CompiledModel) else False
        if nhwc not in self.dense_graphs:
            self.dense_graphs[nhwc] = dense_graph(self.model, self.latency_pool[0][:1], channels_last=nhwc)
        dense = self.dense_graphs[nhwc]

        def run(m: nn.Module) -> Callable[[], None]:
            pool = itertools.cycle(self.latency_pool)

            def call() -> None:
                with torch.no_grad():
                    m(next(pool))
            return call

        t = time_interleaved({"dense": run(dense), "model": run(model)}, warmup=3,
                             rounds=LATENCY_ROUNDS, progress=False)
        return t["model"].median, t["dense"].median

    def evaluate(self, idx: dict[str, int], phase: str, note: str = "") -> Trial:
        """Compile allocation ``idx``, run the metric on it, time it: one trial (reused when the
        same configuration was evaluated before)."""
        key = self.key_for(idx)
        if key in self.by_key:
            return self.by_key[key]
        if key not in self.cache["metrics"]:
            self.check_time(float(np.mean(self.step_seconds)) if self.step_seconds else 0.0)
        t0 = clock()
        cfg, notes, _ = self.realize(idx)
        proxy = self.proxy()
        model = self.compile_candidate(idx, cfg, notes)
        value, margin, cached = self.metric(model, key)
        feasible = value - margin >= self.floor_value - 1e-12
        summary = model.report.summary
        ms, dense_ms = self.latency(model)
        trial = Trial(index=len(self.trials), phase=phase,
                      ratios={lay.name: round(lay.ratios[idx[t]], 6) for t, lay in self.layers.items()
                              if idx[t] > 0},
                      metric=value, feasible=feasible, mac_reduction=summary.get("mac_reduction"),
                      latency_ms=ms, dense_latency_ms=dense_ms, proxy=proxy, seconds=clock() - t0,
                      cached=cached, note=note, margin=margin)
        if not cached:
            self.step_seconds.append(trial.seconds)
        self.trial_idx[trial.index] = dict(idx)
        self.trials.append(trial)
        self.by_key[key] = trial
        if feasible and (self.best_index is None or self.better(trial, self.trials[self.best_index])):
            if self.best_index is not None and self.best_index != 0:
                self.models.pop(self.best_index, None)
            self.best_index = trial.index
            self.models[trial.index] = model
        if self.bar is not None:
            self.bar.update(1)
            best = self.trials[self.best_index]
            self.bar.set_postfix_str(f"best: {100 * (best.mac_reduction or 0):.1f}% fewer MACs, "
                                     f"metric {best.metric:.4g}")
        return trial

    def better(self, a: Trial, b: Trial) -> bool:
        """Is ``a`` better than ``b`` for the target (both within the budget)?"""
        if self.target == "latency":
            return (a.latency_ms, -(a.mac_reduction or 0)) < (b.latency_ms, -(b.mac_reduction or 0))
        return (a.mac_reduction or 0) > (b.mac_reduction or 0)  # a tie keeps the earlier one

    # ---- the search proper -------------------------------------------------------------------

    def sensitivity(self) -> None:
        """Each layer gated alone at each ratio: the output error it causes (cached by file)."""
        skey = json.dumps({"mode": self.mode, "seed": self.seed, "classifier": self.classifier,
                           "config": self.search_cfg.to_dict()}, sort_keys=True)
        stored = self.cache["sensitivity"].get(skey, {})
        todo = [lay for lay in self.layers.values()
                if stored.get(lay.target, {}).get("ratios") != _on_grid(lay, lay.ratios)]
        for lay in self.layers.values():
            if lay not in todo:
                _expand(lay, [v if v is not None else math.inf for v in stored[lay.target]["proxy"]])
        total = sum(sum(lay.coarse) - 1 for lay in todo)
        bar = tqdm(total=total, desc="ispc tune: sensitivity", disable=not self.progress, leave=False)
        try:
            self._sensitivity(todo, stored, skey, bar)
        finally:
            bar.close()
            if todo:
                self.save_cache()

    def _sensitivity(self, todo: list[_Layer], stored: dict[str, Any], skey: str, bar: Any) -> None:
        per = None
        for lay in todo:
            curve = [0.0]
            for i in range(1, len(lay.ratios)):
                if not lay.coarse[i]:
                    continue
                if curve[-1] > PROXY_CAP:
                    curve.append(math.inf)
                    bar.update(1)
                    continue
                self.check_time(per or 0.0)
                t0 = clock()
                self.set_layer(lay, lay.settings[i])
                curve.append(self.proxy())
                per = clock() - t0
                bar.update(1)
            self.set_layer(lay, None)
            _expand(lay, curve)
            stored[lay.target] = {"ratios": _on_grid(lay, lay.ratios),
                                  "proxy": [v if math.isfinite(v) else None for v in curve]}
            self.cache["sensitivity"][skey] = stored

    def path(self) -> list[dict[str, int]]:
        """The greedy path from dense: each step the move (a layer to a lower ratio) with the least
        sensitivity per unit of cost saved; ties: the larger saving, then the higher CV."""
        env = {}
        for t, lay in self.layers.items():
            run = 0.0
            env[t] = [run := max(run, v) for v in lay.proxy]
        idx = {t: 0 for t in self.layers}
        out = [dict(idx)]
        while True:
            best = None
            for t, lay in self.layers.items():
                i = idx[t]
                for j in range(i + 1, len(lay.ratios)):
                    if not lay.coarse[j] or not lay.allowed[j] or not math.isfinite(env[t][j]):
                        continue
                    ds = self._saving(lay, i, j, idx)
                    if ds <= 0:
                        continue
                    score = (max(env[t][j] - env[t][i], 0.0) / ds, -ds, -lay.cv, lay.name)
                    if best is None or score < best[0]:
                        best = (score, t, j)
            if best is None:
                return out
            idx[best[1]] = best[2]
            out.append(dict(idx))

    def bisect(self, path: list[dict[str, int]]) -> int:
        """The last feasible point of ``path`` (assumed monotone), by bisection on its cost."""
        costs = [self.cost(p) for p in path]
        lo, hi = 0, len(path)  # path[0] (dense) is feasible; path[hi] the first known infeasible
        tol = BISECT_TOL * costs[0]
        while hi - lo > 1:
            end = costs[hi] if hi < len(path) else costs[-1]
            if costs[lo] - end < tol and hi < len(path):
                break
            goal = (costs[lo] + end) / 2
            mid = min(range(lo + 1, hi), key=lambda i: (abs(costs[i] - goal), i))
            trial = self.evaluate(path[mid], "path", note=f"path step {mid}/{len(path) - 1}")
            if trial.feasible:
                lo = mid
            else:
                hi = mid
        return lo

    def refine(self, idx: dict[str, int]) -> None:
        """From ``idx``, single-layer steps, the one adding the least output error per unit of
        cost saved first, each checked with the metric; a step that breaks the budget is rolled
        back and its layer frozen, unless it missed the budget narrowly (by less than
        :data:`NARROW` of ``max_drop``): that layer goes on in half steps. :data:`MAX_ROLLBACKS`
        in a row end it."""
        frozen: set[str] = set()
        halved: set[str] = set()  # layers that take half steps (between grid points) from now on
        narrow = NARROW * (self.dense_metric - self.floor_value)
        failed = 0
        while failed < MAX_ROLLBACKS:
            moves = []
            for t, lay in self.layers.items():
                j = next((j for j in range(idx[t] + 1, len(lay.ratios))
                          if lay.allowed[j] and (lay.coarse[j] or t in halved)), None)
                if t not in frozen and j is not None:
                    moves.append((t, j))
            if not moves:
                return
            _, _, samples = self.realize(idx)
            base_err = self.proxy()
            ranked = []
            for t, j in moves:
                lay = self.layers[t]
                ds = self._saving(lay, idx[t], j, idx)
                if ds <= 0:
                    continue
                old = (lay.module.threshold, lay.module.k, lay.mask)
                setting = (lay.setting_for(lay.ratios[j], self.base.mode, self.base.channel_multiple,
                                           samples.get(t)) if not self.static else lay.settings[j])
                self.set_layer(lay, setting)
                err = self.proxy()
                lay.module.threshold, lay.module.k, lay.mask = old
                ranked.append((max(err - base_err, 0.0) / ds, -ds, -lay.cv, lay.name, t, j, err))
            ranked.sort()
            accepted = reopened = False
            for *_, t, j, err in ranked:
                if failed >= MAX_ROLLBACKS:
                    break
                lay = self.layers[t]
                nxt = {**idx, t: j}
                trial = self.evaluate(nxt, "greedy",
                                      note=f"{lay.name} {lay.ratios[idx[t]]:.3g}->{lay.ratios[j]:.3g}")
                if trial.feasible:
                    idx = nxt
                    accepted = True
                    failed = 0
                    break
                failed += 1
                half = any(lay.allowed[h] for h in range(idx[t] + 1, j))
                if t not in halved and half and \
                        trial.metric - trial.margin >= self.floor_value - narrow - 1e-12:
                    halved.add(t)
                    reopened = True
                    why = " (rolled back; half steps next)"
                else:
                    frozen.add(t)
                    why = " (rolled back)"
                if trial.phase == "greedy" and "(rolled back" not in trial.note:
                    trial.note += why
            if not accepted and not reopened:
                return

    def run(self) -> CompiledModel:
        self.build()
        self.load_cache()
        self.best_index: int | None = None
        self.bar = None
        self.dense_graphs: dict[bool, nn.Module] = {}
        dense_key = "dense"
        if dense_key in self.cache["metrics"]:
            dense_value, dense_cached = float(self.cache["metrics"][dense_key]), True
        else:
            dense_value, _, dense_cached = self.metric(self.model, dense_key)
        self.dense_metric = dense_value
        self.floor_value = self.floor(dense_value)
        idx0 = {t: 0 for t in self.layers}
        dense_model = self._dense_model()
        ms, dense_ms = self.latency(dense_model)
        self.trials.append(Trial(index=0, phase="dense", ratios={}, metric=dense_value, feasible=True,
                                 mac_reduction=dense_model.report.summary.get("mac_reduction") or 0.0,
                                 latency_ms=ms, dense_latency_ms=dense_ms, proxy=0.0,
                                 cached=dense_cached, note="the model as given (every channel kept)"))
        self.trial_idx[0] = idx0
        self.by_key[self.key_for(idx0)] = self.trials[0]
        self.best_index = 0
        self.models[0] = dense_model
        if not self.layers:
            self.notes.append("no layer can be gated under this config: the model comes back dense")
            return self.finish()
        try:
            self.sensitivity()
            if self.target == "latency":
                self.time_layers()
            self.bar = tqdm(desc="ispc tune: search", unit="eval", disable=not self.progress,
                            leave=False)
            path = self.path()
            self.path_length = len(path) - 1
            lo = self.bisect(path)
            self.refine(path[lo])
        except _OutOfTime as exc:
            self.stopped = ("max_evaluations reached" if exc.args and exc.args[0] == "max_evaluations"
                            else f"the time budget ({self.deadline - self.start:.0f} s) would have "
                                 "been exceeded by the next step")
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.finish()

    def finish(self) -> CompiledModel:
        best = self.trials[self.best_index]
        model = self.models[best.index]
        within = [t for t in self.trials if t.feasible]
        if self.target == "latency":
            why = (f"lowest measured latency ({best.latency_ms:.3f} ms against {best.dense_latency_ms:.3f} "
                   f"ms dense, {100 * (best.mac_reduction or 0):.1f}% fewer MACs) of the "
                   f"{len(within)} configurations within the budget")
        else:
            why = (f"fewest MACs ({100 * (best.mac_reduction or 0):.1f}% fewer than dense) of the "
                   f"{len(within)} configurations within the budget")
        beyond = [t for t in self.trials if t.feasible is False and (
            (t.latency_ms or 0) < (best.latency_ms or 0) if self.target == "latency"
            else (t.mac_reduction or 0) > (best.mac_reduction or 0))]
        clears = (f"metric {best.metric:.4g}" + (f" - margin {best.margin:.3g}" if best.margin else "")
                  + f" >= {self.floor_value:.4g}")
        if beyond:
            top = max(beyond, key=lambda t: t.metric - t.margin)
            why += (f" ({clears}); the {len(beyond)} "
                    f"{'faster' if self.target == 'latency' else 'cheaper'} ones tried scored below "
                    f"the budget, at best {top.metric:.4g}"
                    + (f" - margin {top.margin:.3g}" if top.margin else ""))
        else:
            why += f" ({clears})"
        if self.stopped:
            why += "; the search stopped early, so this is the best found so far"
        fractions = None
        if self.static:
            fractions = {lay.name: lay.ratios[self.trial_idx[best.index][t]] for t, lay in self.layers.items()
                         if self.trial_idx[best.index][t] > 0}
        layers = []
        for t, lay in self.layers.items():
            layers.append({"name": lay.name, "cv": lay.cv, "macs": lay.macs, "in_channels": lay.channels,
                           "chosen_ratio": lay.ratios[self.trial_idx[best.index][t]],
                           "ratios": lay.ratios,
                           "sensitivity": [v if math.isfinite(v) else None for v in lay.proxy],
                           "ms": lay.ms})
        seconds = clock() - self.start
        rkey = json.dumps({"mode": self.mode, "target": self.target, "max_drop": self.max_drop,
                           "relative": self.relative, "seed": self.seed,
                           "confidence": self.confidence if self.dense_scores is not None else None,
                           "config": self.search_cfg.to_dict()}, sort_keys=True)
        runs = list(self.cache["runs"].get(rkey, []))
        earlier = list(itertools.takewhile(lambda r: r["stopped"], reversed(runs)))[::-1]
        self.cache["runs"][rkey] = runs + [{"seconds": round(seconds, 1),
                                               "evaluations": self.evaluations,
                                               "stopped": self.stopped}]
        self.save_cache()
        report = TuneReport(
            target=self.target, mode=self.mode, dense_metric=self.dense_metric,
            max_drop=self.max_drop, relative=self.relative, floor=self.floor_value,
            confidence=self.confidence if self.dense_scores is not None else None,
            trials=self.trials, chosen=best.index, why=why, stopped=self.stopped,
            seconds=seconds, evaluations=self.evaluations,
            config=model.config.to_dict(), keep_fractions=fractions, layers=layers,
            notes=list(self.notes), earlier_runs=earlier)
        model.tuning = report
        model.report.notes.append(f"ispc.tune: chosen #{best.index} of {len(self.trials)} "
                                  f"configurations tried ({self.evaluations} metric evaluations): "
                                  f"{why}; the search is in .tuning")
        return model


@checked_options
def tune(model: nn.Module, calibration_data: Any, *, evaluate: Callable[[nn.Module], float],
         max_drop: float, relative: bool = False, target: str = "latency",
         config: GatingConfig | None = None, time_budget_s: float | None = None, seed: int = 0,
         progress: bool | None = None, static: bool = False, max_evaluations: int | None = None,
         cache: str | os.PathLike[str] | None = None, confidence: float = 0.9) -> CompiledModel:
    """The fastest compiled model whose metric stays within ``max_drop`` of the dense model's.

    Args:
        model: the trained model (never modified).
        calibration_data: as for :func:`ispc.compile` (required): the search's statistics, its
            output-error estimates and the latency measurements all run on it.
        evaluate: ``evaluate(model) -> float``, the metric on your validation data, higher is
            better (e.g. ``ispc.tune.top1(val_loader)``: top-1 in percent). Called on the model
            as given once, then on each compiled candidate the search checks. It may return a
            1-D tensor of per-sample scores instead (the metric is their mean; e.g.
            ``ispc.tune.top1(val_loader, per_sample=True)``): then each candidate must clear the
            budget by a margin for the validation data's noise (``confidence``).
        max_drop: how far below the dense model's metric a result may be, in the metric's units
            (with ``relative=True``: a fraction of the dense metric, e.g. 0.01 for 1%).
        target: ``"latency"``: the lowest measured latency at ``config.latency_batch_size``, with
            latency-aware kernel selection; ``"macs"``: the fewest MACs executed.
        config: the :class:`GatingConfig` to search from (mode, saliency, which layers may be
            gated, ...); ``tune`` sets ``layer_keep_ratios`` (one entry per searched layer) and
            ``keep_ratio=1.0``, and ``latency_aware`` for ``target="latency"``.
        time_budget_s: stop before a step would exceed this many seconds and return the best
            model found so far (the report says so).
        seed: picks the calibration inputs the output-error estimate runs on; the search is
            deterministic for a seed (with ``target="macs"``; latencies are measured).
        progress: progress bars (default: when attached to a terminal).
        static: search static pruning instead (:func:`ispc.static_prune`: the same channels for
            every input), the baseline; returns a ``StaticPrunedModel`` and the fractions in
            ``.tuning.keep_fractions``.
        max_evaluations: stop after this many metric evaluations.
        cache: a JSON file keeping the metric values and sensitivities of this search: a search
            run again with it (e.g. after a time budget stopped it) replays them and goes on. It
            belongs to one model, calibration data and metric.
        confidence: with per-sample scores, a candidate is within the budget only when the
            one-sided ``confidence`` bound of its drop stays within ``max_drop``: its metric minus
            ``z * se`` clears the floor, where ``se`` is the standard error of the mean per-sample
            difference from the dense model (paired) and ``z`` the normal quantile; 0.5 is the
            point estimate. It keeps a search that tries many candidates from picking one whose
            validation score was lucky.

    Returns:
        the chosen :class:`CompiledModel`; ``.config`` reproduces it
        (``ispc.compile(model, calibration_data, config=result.config)``) and ``.tuning`` is the
        :class:`TuneReport` (every configuration tried, its metric, MACs and measured latency,
        and why the chosen one won).
    """
    if not callable(evaluate):
        raise ConfigError(f"evaluate must be a callable model -> float (higher is better), got "
                          f"{type(evaluate).__name__}; e.g. evaluate=ispc.tune.top1(val_loader)")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or \
            not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"max_drop must be a number >= 0 in the metric's units, got {max_drop!r}; "
                          "e.g. max_drop=0.5 for half a point of top-1 in percent")
    if not isinstance(relative, bool):
        raise ConfigError(f"relative must be True or False, got {relative!r}")
    if relative and max_drop >= 1:
        raise ConfigError(f"with relative=True, max_drop is a fraction of the dense metric in "
                          f"[0, 1), got {max_drop!r}; e.g. max_drop=0.01 for 1%")
    if target not in TARGETS:
        raise ConfigError(f"target={target!r} is not one of {', '.join(map(repr, TARGETS))}")
    if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(
            time_budget_s, (int, float)) or not time_budget_s > 0):
        raise ConfigError(f"time_budget_s must be a positive number of seconds or None, got "
                          f"{time_budget_s!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if max_evaluations is not None and (isinstance(max_evaluations, bool) or not isinstance(
            max_evaluations, int) or max_evaluations < 1):
        raise ConfigError(f"max_evaluations must be a positive int or None, got {max_evaluations!r}")
    if not isinstance(static, bool):
        raise ConfigError(f"static must be True or False, got {static!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or \
            not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be a probability in [0.5, 1), got {confidence!r}; e.g. "
                          "0.9 (0.5: no margin for the validation data's noise)")
    cfg = check_config(config)
    if cfg.layer_keep_ratios:
        raise ConfigError("ispc.tune chooses layer_keep_ratios itself; leave them out of config "
                          "(to keep layers out of the search, use include/exclude)")
    if calibration_data is None:
        raise DataError("ispc.tune needs calibration_data: the search reads each layer's saliency "
                        "statistics from it; pass ~1000 training inputs (a DataLoader or a list)")
    unwrap(model)  # a model ispc can compile, before any work
    data = [calibration_data] if isinstance(calibration_data, Tensor) else calibration_data
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"calibration_data must be an iterable of batches or a Tensor, got "
                        f"{type(calibration_data).__name__}")
    data = list(data)  # read several times
    if not data:
        raise DataError("calibration_data is empty; pass ~1000 training inputs")
    search = _Search(model, data, evaluate, base=cfg, max_drop=float(max_drop), relative=relative,
                     target=target, static=static, seed=seed,
                     progress=default_progress() if progress is None else bool(progress),
                     time_budget_s=float(time_budget_s) if time_budget_s is not None else None,
                     max_evaluations=max_evaluations,
                     cache=Path(cache) if cache is not None else None,
                     confidence=float(confidence))
    return search.run()


tune.top1 = top1  # type: ignore[attr-defined]  # ispc.tune.top1(loader), with ispc.tune the function
