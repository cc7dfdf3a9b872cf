"""Streaming, mergeable statistics of per-instance channel saliency at one gating site."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SaliencyStats"]


class SaliencyStats:
    """Per-channel moments over all instances seen, plus a bounded sample of saliency rows.

    The moments (count, mean, M2 per channel, in float64) are exact over any amount of data and
    merge with Chan's parallel formula, so batches, workers or ranks can be combined in any order.
    The row sample (the first ``max_rows`` instances; merges keep rows in merge order) is what
    thresholds and per-instance kept counts are read from.
    """

    def __init__(self, channels: int, max_rows: int = 4096) -> None:
        self.channels = int(channels)
        self.max_rows = int(max_rows)
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.rows: list[Tensor] = []
        self._rows_n = 0

    def update(self, s: Tensor) -> None:
        """Add a batch of saliency rows ``s`` (N x C)."""
        s = s.detach().to("cpu", torch.float64)
        if s.dim() != 2 or s.shape[1] != self.channels:
            raise ValueError(f"expected saliency rows of width {self.channels}, got {tuple(s.shape)}")
        n = s.shape[0]
        if n == 0:
            return
        b_mean = s.mean(0)
        b_m2 = ((s - b_mean) ** 2).sum(0)
        self._merge_moments(n, b_mean, b_m2)
        self._add_rows(s.to(torch.float32))

    def _merge_moments(self, n: int, mean: Tensor, m2: Tensor) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def _add_rows(self, rows: Tensor) -> None:
        room = self.max_rows - self._rows_n
        if room > 0:
            take = rows[:room]
            self.rows.append(take)
            self._rows_n += take.shape[0]

    def merge(self, other: "SaliencyStats") -> "SaliencyStats":
        """Fold ``other`` into this one (in place); returns self."""
        if other.channels != self.channels:
            raise ValueError("cannot merge statistics of sites with different channel counts")
        if other.count:
            self._merge_moments(other.count, other.mean, other.m2)
            for r in other.rows:
                self._add_rows(r)
        return self

    @property
    def sample(self) -> Tensor:
        """The kept saliency rows (R x C, float32)."""
        if not self.rows:
            return torch.zeros(0, self.channels)
        if len(self.rows) > 1:
            self.rows = [torch.cat(self.rows)]
        return self.rows[0]

    @property
    def std(self) -> Tensor:
        if self.count < 2:
            return torch.zeros_like(self.mean)
        return (self.m2 / (self.count - 1)).clamp_min(0).sqrt()

    def channel_cv(self) -> Tensor:
        """Coefficient of variation across instances, per channel (0 for dead channels)."""
        live = self.mean > 0
        cv = torch.zeros_like(self.mean)
        cv[live] = self.std[live] / self.mean[live]
        return cv

    def layer_cv(self) -> float:
        """Mean per-channel CV over live channels: how much this layer's channel usage varies
        from input to input."""
        live = self.mean > 0
        if not bool(live.any()):
            return 0.0
        return float(self.channel_cv()[live].mean())

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"channels": self.channels, "max_rows": self.max_rows, "count": self.count,
                "mean": self.mean, "m2": self.m2, "rows": self.sample}

    @classmethod
    def from_state_dict(cls, d: dict) -> "SaliencyStats":
        st = cls(int(d["channels"]), int(d["max_rows"]))
        st.count = int(d["count"])
        st.mean, st.m2 = d["mean"].clone(), d["m2"].clone()
        rows = d["rows"]
        if rows.numel():
            st.rows, st._rows_n = [rows.clone()], rows.shape[0]
        return st
