"""Tensor-parallel building blocks: parallel linears (and, as they land, TP norms)."""

from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]
