"""Compute/communication overlap for tensor-parallel blocks (TokenWeave, generalised).

* :func:`fused_allreduce_rms_norm`: all-reduce (or reduce-scatter) + residual add + RMSNorm
  (+ all-gather) as one op, any dtype, world size and device.
* :func:`plan_token_split` / :class:`DeviceProfile` / :class:`TokenSplitPlan`: where to split a
  batch's tokens in two, from an analytic cost model.
* :class:`TokenWeaver`: runs a stack of TP blocks on two token halves, one half's collective in
  flight while the other computes.

See ``docs/overlap.md``.
"""

from distnorm.overlap.fused import add_rms_norm, fused_allreduce_rms_norm, symm_mem_unavailable_reason
from distnorm.overlap.token_split import (
    DeviceProfile,
    ParallelMLPBlock,
    TokenSplitPlan,
    TokenWeaver,
    plan_token_split,
)

__all__ = [
    "DeviceProfile",
    "ParallelMLPBlock",
    "TokenSplitPlan",
    "TokenWeaver",
    "add_rms_norm",
    "fused_allreduce_rms_norm",
    "plan_token_split",
    "symm_mem_unavailable_reason",
]
