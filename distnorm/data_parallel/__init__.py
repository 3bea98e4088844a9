"""Data-parallel and running-statistics norms: statistics of the whole DP batch, identical on every rank.

See ``docs/data_parallel.md``. Every class takes ``group`` (the data-parallel group; None = local),
``channel_dim`` (1 for ``[N, C, *]``, -1 for ``[B, T, C]``) and an optional ``mask`` in forward.
"""

from distnorm.data_parallel.alpha_batch_norm import AlphaBatchNorm, alpha_batch_norm, alpha_batch_norm_ref
from distnorm.data_parallel.batch_channel_norm import BatchChannelNorm
from distnorm.data_parallel.evo_norm import EvoNormB0, EvoNormS0
from distnorm.data_parallel.power_norm import PowerNorm
from distnorm.data_parallel.rep_batch_norm import ProgressiveRepBN, RepBatchNorm
from distnorm.data_parallel.running_stats import (
    broadcast_running_stats,
    recalibrate,
    running_stat_buffers,
    sync_running_stats,
)
from distnorm.data_parallel.sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from distnorm.data_parallel.unified_norm import UnifiedNorm

__all__ = [
    "AlphaBatchNorm",
    "BatchChannelNorm",
    "EvoNormB0",
    "EvoNormS0",
    "PowerNorm",
    "ProgressiveRepBN",
    "RepBatchNorm",
    "SyncBatchNorm",
    "UnifiedNorm",
    "alpha_batch_norm",
    "alpha_batch_norm_ref",
    "broadcast_running_stats",
    "convert_sync_batchnorm",
    "recalibrate",
    "running_stat_buffers",
    "sync_batch_norm",
    "sync_running_stats",
]
