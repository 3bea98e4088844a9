"""Compute/communication overlap for tensor-parallel blocks (TokenWeave, generalised).

* :func:`fused_allreduce_rms_norm`: all-reduce (or reduce-scatter) + residual add + RMSNorm
  (+ all-gather) as one op, any dtype, world size and device; ``normed_grad="partial"`` for the
  minimum-byte backward.
* :func:`plan_token_split` / :class:`DeviceProfile` / :class:`TokenSplitPlan`: where to split a
  batch's tokens in two, from an analytic cost model.
* :class:`TokenWeaver`: runs a stack of TP blocks on two token halves, one half's collective in
  flight while the other computes, forward and backward.
* :class:`SimulatedLink`: a modelled network link around the collectives, so that overlap can be
  measured on a CPU (benchmarks, tests).

See ``docs/overlap.md``.
"""

from distnorm.overlap.fused import add_rms_norm, fused_allreduce_rms_norm, symm_mem_unavailable_reason
from distnorm.overlap.link import SimulatedLink
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
    "SimulatedLink",
    "TokenSplitPlan",
    "TokenWeaver",
    "add_rms_norm",
    "fused_allreduce_rms_norm",
    "plan_token_split",
    "symm_mem_unavailable_reason",
]
