"""Shared helpers for the data-parallel parity tests: batch splits with an empty rank."""

from __future__ import annotations

import torch.distributed as dist

from distnorm.comm import shard_sizes


def world_group(world: int):
    return dist.group.WORLD if world > 1 else None


def sizes_with_empty_rank(n: int, world: int) -> list[int]:
    """Rank 0 holds nothing (when world > 1); the others split ``n`` unevenly."""
    return [n] if world == 1 else [0, *shard_sizes(n, world - 1)]
