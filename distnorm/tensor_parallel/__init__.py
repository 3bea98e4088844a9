"""Tensor-parallel building blocks: parallel linears and tensor-parallel norms.

* token-sharded activations, replicated parameters: ``SequenceParallelLayerNorm``,
  ``SequenceParallelRMSNorm`` (+ ``sync_sequence_parallel_grads`` for ``grad_sync="deferred"``);
* hidden-sharded activations and parameters: ``ShardedLayerNorm``, ``ShardedRMSNorm``;
* variants in both forms (``parallel="sequence" | "sharded"``): ``SingleScaleRMSNorm``,
  ``CRMSNorm``; ``layer_norm_scaling(layer_index)`` for ``output_scale``;
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
from distnorm.tensor_parallel.variants import CRMSNorm, SingleScaleRMSNorm, layer_norm_scaling

__all__ = [
    "CRMSNorm",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SequenceParallelLayerNorm",
    "SequenceParallelNorm",
    "SequenceParallelRMSNorm",
    "ShardedLayerNorm",
    "ShardedNorm",
    "ShardedRMSNorm",
    "SingleScaleRMSNorm",
    "layer_norm_scaling",
    "sync_sequence_parallel_grads",
]
