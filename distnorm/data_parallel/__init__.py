"""Data-parallel and running-statistics norms: statistics of the whole DP batch, identical on every rank.

See ``docs/data_parallel.md``. Every class takes ``group`` (the data-parallel group; None = local),
``channel_dim`` (1 for ``[N, C, *]``, -1 for ``[B, T, C]``) and an optional ``mask`` in forward.
"""

from distnorm.data_parallel.alpha_batch_norm import AlphaBatchNorm, alpha_batch_norm, alpha_batch_norm_ref
from distnorm.data_parallel.running_stats import (
    broadcast_running_stats,
    recalibrate,
    running_stat_buffers,
    sync_running_stats,
)
from distnorm.data_parallel.sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

__all__ = [
    "AlphaBatchNorm",
    "SyncBatchNorm",
    "alpha_batch_norm",
    "alpha_batch_norm_ref",
    "broadcast_running_stats",
    "convert_sync_batchnorm",
    "recalibrate",
    "running_stat_buffers",
    "sync_batch_norm",
    "sync_running_stats",
]
