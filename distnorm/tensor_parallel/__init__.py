"""Tensor-parallel building blocks: parallel linears and tensor-parallel norms.

* token-sharded activations, replicated parameters: ``SequenceParallelLayerNorm``,
  ``SequenceParallelRMSNorm`` (+ ``sync_sequence_parallel_grads`` for ``grad_sync="deferred"``);
* hidden-sharded activations and parameters: ``ShardedLayerNorm``, ``ShardedRMSNorm``;
* Megatron linears: ``ColumnParallelLinear``, ``RowParallelLinear``.
"""

from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear
from distnorm.tensor_parallel.sequence_parallel import (
    SequenceParallelLayerNorm,
    SequenceParallelNorm,
    SequenceParallelRMSNorm,
    sync_sequence_parallel_grads,
)
from distnorm.tensor_parallel.sharded import ShardedLayerNorm, ShardedNorm, ShardedRMSNorm

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SequenceParallelLayerNorm",
    "SequenceParallelNorm",
    "SequenceParallelRMSNorm",
    "ShardedLayerNorm",
    "ShardedNorm",
    "ShardedRMSNorm",
    "sync_sequence_parallel_grads",
]
