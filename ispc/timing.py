"""Wall-clock timing helpers shared by the passes (latency-aware kernel selection) and the
benchmarks (:mod:`ispc.benchmark` re-exports them), and when to show progress bars.

Timing rules (DESIGN.md): warm-up first, then many *interleaved* rounds (every candidate once per
round, in a rotating order) so that drift and background load hit all candidates alike; report
medians and the spread.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Timing", "Paired", "paired", "time_interleaved", "retain_freed_memory",
           "default_progress"]


def default_progress() -> bool:
    """Progress bars when a person is watching (stderr is a terminal)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def retain_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A CNN's activations are large (VGG-16's first feature map is 12.8 MB at batch 1): by default
    glibc hands such blocks back to the kernel when they are freed and the next forward pass faults
    every page in again. On the project's VM that cost ~3 us per 4 KiB page and made the same
    convolution take 2.6 to 43 ms depending on which allocations preceded it, in dense and gated
    models alike. Benchmarks call this once per process (it affects both models equally);
    deployments get the same effect from ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` or
    jemalloc/tcmalloc. Returns what was done, for the results' record.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system allocator (not glibc: left as is)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_trim_threshold, 1 << 30) and (mallopt(m_mmap_threshold, 1 << 30)
                                                  or mallopt(m_mmap_threshold, 32 << 20))
    return "glibc, freed memory retained" if ok else "glibc (mallopt refused: left as is)"


@dataclass
class Timing:
    """Per-call wall-clock times of one candidate, in milliseconds."""

    name: str
    times_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p25(self) -> float:
        return statistics.quantiles(self.times_ms, n=4)[0] if len(self.times_ms) > 1 else self.median

    @property
    def p75(self) -> float:
        return statistics.quantiles(self.times_ms, n=4)[2] if len(self.times_ms) > 1 else self.median


@dataclass(frozen=True)
class Paired:
    """``a`` against ``b`` timed in the same rounds: the per-round ratios ``a / b``. A busy spell
    of the machine falls on both in a round and cancels out of the ratio."""

    ratios: tuple[float, ...]

    @property
    def rounds(self) -> int:
        return len(self.ratios)

    @property
    def median(self) -> float | None:
        """The median ratio (None: no round pairs up)."""
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def faster_in(self) -> int:
        """The rounds ``a`` was faster in."""
        return sum(r < 1.0 for r in self.ratios)

    @property
    def low(self) -> float | None:
        return min(self.ratios) if self.ratios else None

    @property
    def high(self) -> float | None:
        return max(self.ratios) if self.ratios else None

    def beats(self, margin: float) -> bool:
        """Whether ``a`` is faster by more than ``margin`` (median ratio) and in most rounds."""
        return bool(self.ratios) and self.median < 1.0 - margin and 2 * self.faster_in > self.rounds


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """``a`` against ``b``, per-round figures (block medians) of the same rounds; no ratio where
    the two do not pair up (another count of rounds) or ``b`` is not positive. The one pairing
    rule of the route's decision and the benchmark's reports."""
    if len(a) != len(b):
        return Paired(())
    return Paired(tuple(x / y for x, y in zip(a, b) if y > 0))


def time_interleaved(candidates: dict[str, Callable[[], Any]], *, warmup: int = 5, rounds: int = 30,
                     progress: bool = True, desc: str = "ispc: timing",
                     prune_ratio: float | None = None, keep: Iterable[str] = (),
                     min_samples: int = 2, budget_s: float | None = None,
                     min_rounds: int = 5, shuffle: int | None = None) -> dict[str, Timing]:
    """Time each zero-argument callable ``rounds`` times, interleaved, after ``warmup`` calls each.

    ``prune_ratio``: once every candidate has ``min_samples`` times, stop timing a candidate (not
    in ``keep``) whose fastest call is slower than ``prune_ratio`` times the leader's median: it
    cannot win, and timing it again only costs (its Timing keeps the calls it had).
    ``budget_s``: stop after ``min_rounds`` rounds once the timed calls took this long in all
    (long calls vary less relative to their length: fewer of them tell as much).
    ``shuffle``: a seed; each round then runs the candidates in a fresh random order instead of
    rotating one order, whose every candidate always follows the same one (a build A/B'd beside a
    dense model that evicts the caches reads slower than an identical copy placed elsewhere)."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    out = {name: Timing(name) for name in names}
    active, kept = list(names), set(keep)
    spent = 0.0
    rng = random.Random(shuffle)
    for r in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        order = (rng.sample(active, len(active)) if shuffle is not None
                 else active[r % len(active):] + active[:r % len(active)])
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            out[name].times_ms.append((time.perf_counter() - t0) * 1e3)
            spent += out[name].times_ms[-1] / 1e3
        if budget_s is not None and r + 1 >= min_rounds and spent >= budget_s:
            break
        if prune_ratio is not None and r + 1 >= min_samples and len(active) > 1:
            lead = min(out[n].median for n in active)
            active = [n for n in active if n in kept or min(out[n].times_ms) <= prune_ratio * lead]
    return out
