"""Merging calibration statistics across torch.distributed ranks.

When a process group is initialized, every rank calibrates on its own shard and the statistics are
combined so that all ranks choose the same thresholds: the same ones a single process would choose
over the ranks' data in rank order.
"""
from __future__ import annotations

import torch

from .observers import SaliencyStats

__all__ = ["world_size", "merge_stats", "gather_rows"]


def world_size() -> int:
    """Ranks in the default process group (1 when torch.distributed is not in use)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def merge_stats(stats: list[SaliencyStats]) -> list[SaliencyStats]:
    """All ranks' statistics for the same sites, merged in rank order (identical on every rank)."""
    if world_size() == 1:
        return stats
    gathered: list[list[dict] | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, [s.state_dict() for s in stats])
    merged = []
    for i, local in enumerate(stats):
        acc = SaliencyStats(local.channels, local.max_rows)
        for rank_states in gathered:
            acc.merge(SaliencyStats.from_state_dict(rank_states[i]))  # type: ignore[index]
        merged.append(acc)
    return merged


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of rows from every rank, in rank order."""
    if world_size() == 1:
        return rows
    gathered: list[torch.Tensor | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, rows.cpu())
    return torch.cat(gathered)  # type: ignore[arg-type]
