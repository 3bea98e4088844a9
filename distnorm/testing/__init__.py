"""Test helpers: simulated and real multi-rank worlds, rank chunking, reference comparison.

See ``docs/testing.md`` for how to write a simulated-distributed test.
"""

from distnorm.testing._compare import assert_close_to_reference, chunk_for_rank, max_abs_error, split_for_world
from distnorm.testing._gradcheck import distributed_gradcheck
from distnorm.testing._world import RankTimeoutError, free_port, simulate, spawn

__all__ = [
    "RankTimeoutError",
    "assert_close_to_reference",
    "chunk_for_rank",
    "distributed_gradcheck",
    "free_port",
    "max_abs_error",
    "simulate",
    "spawn",
    "split_for_world",
]
