"""distnorm: normalization layers as first-class citizens of distributed PyTorch.

The public API is re-exported here lazily: ``import distnorm`` imports only this file, and each
name loads its module on first use (so Triton, DeepSpeed and mpi4py are imported only by the
code that needs them). ``docs/api.md`` lists every name.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation
    "Topology": "distnorm.topology",
    "init_distributed": "distnorm.topology",
    "count_collectives": "distnorm.comm",
    "shard_sizes": "distnorm.comm",
    # tensor parallel
    "SequenceParallelLayerNorm": "distnorm.tensor_parallel",
    "SequenceParallelRMSNorm": "distnorm.tensor_parallel",
    "ShardedLayerNorm": "distnorm.tensor_parallel",
    "ShardedRMSNorm": "distnorm.tensor_parallel",
    "SingleScaleRMSNorm": "distnorm.tensor_parallel",
    "CRMSNorm": "distnorm.tensor_parallel",
    "layer_norm_scaling": "distnorm.tensor_parallel",
    "ColumnParallelLinear": "distnorm.tensor_parallel",
    "RowParallelLinear": "distnorm.tensor_parallel",
    # data parallel
    "SyncBatchNorm": "distnorm.data_parallel",
    "convert_sync_batchnorm": "distnorm.data_parallel",
    "PowerNorm": "distnorm.data_parallel",
    "UnifiedNorm": "distnorm.data_parallel",
    "RepBatchNorm": "distnorm.data_parallel",
    "ProgressiveRepBN": "distnorm.data_parallel",
    "BatchChannelNorm": "distnorm.data_parallel",
    "EvoNormB0": "distnorm.data_parallel",
    "EvoNormS0": "distnorm.data_parallel",
    "AlphaBatchNorm": "distnorm.data_parallel",
    "sync_running_stats": "distnorm.data_parallel",
    "broadcast_running_stats": "distnorm.data_parallel",
    "recalibrate": "distnorm.data_parallel",
    # overlap
    "fused_allreduce_rms_norm": "distnorm.overlap",
    "plan_token_split": "distnorm.overlap",
    "TokenWeaver": "distnorm.overlap",
    "TokenSplitPlan": "distnorm.overlap",
    "DeviceProfile": "distnorm.overlap",
    # conversion
    "convert_norms": "distnorm.convert",
    "to_sequence_parallel": "distnorm.convert",
    "to_sharded": "distnorm.convert",
    "to_sync_batch_norm": "distnorm.convert",
    "to_power_norm": "distnorm.convert",
    "to_unified_norm": "distnorm.convert",
    "fold_norms": "distnorm.convert",
    "pre_ln_to_pre_rmsnorm": "distnorm.convert",
    "freeze_norms": "distnorm.freeze",
    "FrozenScaleNorm": "distnorm.freeze",
    # config
    "DistNormConfig": "distnorm.config",
    # training
    "clip_grad_norm_": "distnorm.grad_clip",
    "grad_norm": "distnorm.grad_clip",
}

_SUBMODULES = (
    "comm", "config", "convert", "data_parallel", "debug", "freeze", "functional", "grad_clip", "integrations",
    "kernels", "overlap", "tensor_parallel", "testing", "topology",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"distnorm.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distnorm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
