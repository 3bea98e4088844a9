"""Norm variants in both tensor-parallel forms, chosen by ``parallel="sequence" | "sharded"``.

* ``SingleScaleRMSNorm`` (Outlier-Safe Pre-Training): ``y = α · x / rms(x)``, one learnable scalar
  α shared by every channel (no per-channel gain for outliers to hide in).
* ``CRMSNorm`` (Pre-CRMSNorm, "Pre-RMSNorm and Pre-CRMSNorm Transformers"): the input is a
  zero-mean d-vector stored with its first ``d - 1 = normalized_shape`` coordinates (the last is
  ``-Σx``), so ``y = x / sqrt((Σx² + (Σx)²) / d + eps) · w``.
* SRMSNorm (TransNormer) is plain RMSNorm without affine: ``SequenceParallelRMSNorm(h,
  elementwise_affine=False)`` / ``ShardedRMSNorm(h, elementwise_affine=False)``.
* ``layer_norm_scaling(layer_index)`` = ``1 / sqrt(layer_index)`` (LayerNorm Scaling, "The Curse
  of Depth in Large Language Models"), to pass as ``output_scale`` to any norm here.

``parallel="sequence"``: ``x [*, H]`` holds this rank's tokens; parameters replicated.
``parallel="sharded"``: ``x [*, H_local]``, ``H_local = shard_sizes(H, P)[rank]``.
With ``group`` None or of size 1 the two forms are the same one-device op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distnorm.comm import Group, group_size
from distnorm.kernels.autograd import CRMSNormFn, RMSNormFn, ShardedNormFn
from distnorm.tensor_parallel._common import DeferredGradSync, NormBase, check_inputs, run_on_local, where

__all__ = ["CRMSNorm", "SingleScaleRMSNorm", "layer_norm_scaling"]

PARALLEL_FORMS = ("sequence", "sharded")
_CRMSNormFn = CRMSNormFn  # the name before the Functions moved to distnorm.kernels


def layer_norm_scaling(layer_index: int) -> float:
    """LayerNorm Scaling's output scale for the norm of layer ``layer_index`` (1-based): ``1/sqrt(layer_index)``.

    >>> SequenceParallelRMSNorm(4096, output_scale=layer_norm_scaling(12), group=tp_group)
    """
    if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 1:
        raise ValueError(f"layer_norm_scaling: layer_index must be an int >= 1 (1-based), got {layer_index!r}")
    return 1.0 / math.sqrt(layer_index)


def _check_parallel(cls: str, parallel: str, group: Group) -> str:
    if parallel not in PARALLEL_FORMS:
        raise ValueError(f"{cls}: parallel must be one of {PARALLEL_FORMS}, got {parallel!r} {where(group)}")
    return parallel


class SingleScaleRMSNorm(NormBase, DeferredGradSync):
    """RMSNorm with one learnable scalar gain α (stored as α - 1 with ``zero_centered_gamma``).

    Shapes as the ``parallel`` form says; output in ``x.dtype``. α is replicated in both forms and
    its gradient is a partial sum (over tokens or columns) until summed over ``group``.
    Collectives (P > 1): ``"sequence"``: fwd none, bwd 1 all-reduce of α's gradient (4 B per call;
    none with ``grad_sync="deferred"``). ``"sharded"``: fwd 1 all-reduce 4 B/token (Σx²), bwd 1
    all-reduce 4 B/token (Σg·x_hat) + α's 4 B (unless deferred). ``group`` None or P == 1: none.
    """

    has_bias_option = False

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-6, *, parallel: str = "sequence",
                 zero_centered_gamma: bool = False, output_scale: float = 1.0, grad_sync: str = "backward",
                 group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        cls = "SingleScaleRMSNorm"
        sharded = _check_parallel(cls, parallel, group) == "sharded"
        super().__init__(cls, normalized_shape, eps, False, False, sharded=sharded, single_scale=True,
                         zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, group=group,
                         dtype=dtype, device=device)
        self.parallel = parallel
        self.init_grad_sync(cls, grad_sync, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, sharded = type(self).__name__, self.parallel == "sharded"
        self.check_parameters()
        alpha, grad_group, zcg, s = self.weight, self.grad_group(), self.zero_centered_gamma, self.output_scale

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            check_inputs(cls, x_local, alpha, None, self.local_size, "the local hidden size", self.group)
            if sharded and group_size(self.group) > 1:
                return ShardedNormFn.apply(x_local, alpha, None, self.eps, True, zcg, s, self.group, self.hidden,
                                           "auto", grad_group)
            return RMSNormFn.apply(x_local, alpha, self.eps, zcg, s, "auto", grad_group)

        return run_on_local(x, fn, sharded_hidden=sharded, cls=cls, group=self.group, local_hidden=self.local_size)

    def extra_repr(self) -> str:
        return (super().extra_repr().replace("elementwise_affine=False", "single scale α")
                + f", parallel={self.parallel!r}, grad_sync={self.grad_sync!r}")


class CRMSNorm(NormBase, DeferredGradSync):
    """Compressed RMSNorm of a zero-mean d-vector stored with ``normalized_shape = d - 1`` coordinates.

    ``y = x / sqrt((Σx² + (Σx)²) / d + eps) · w · output_scale``, ``w [d-1]`` (sharded like x in
    the sharded form). Shapes as the ``parallel`` form says; output in ``x.dtype``.
    Collectives (P > 1): ``"sequence"``: fwd none, bwd 1 all-reduce of dw (``d-1`` fp32 numbers per
    call; none with ``grad_sync="deferred"``). ``"sharded"``: fwd 1 all-reduce 8 B/token
    ([Σx², Σx] fp32), bwd 1 all-reduce 4 B/token (Σg·x_hat); dw local. ``group`` None or P == 1: none.
    """

    has_bias_option = False

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-6, elementwise_affine: bool = True, *,
                 parallel: str = "sequence", zero_centered_gamma: bool = False, output_scale: float = 1.0,
                 grad_sync: str = "backward", group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        cls = "CRMSNorm"
        sharded = _check_parallel(cls, parallel, group) == "sharded"
        super().__init__(cls, normalized_shape, eps, elementwise_affine, False, sharded=sharded,
                         zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, group=group,
                         dtype=dtype, device=device)
        self.parallel = parallel
        self.init_grad_sync(cls, grad_sync, group)

    def deferred_parameters(self) -> list[nn.Parameter]:
        return [] if self.parallel == "sharded" else super().deferred_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, sharded = type(self).__name__, self.parallel == "sharded"
        self.check_parameters()
        stats_group = self.group if sharded else None
        grad_group = None if sharded else self.grad_group()

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            check_inputs(cls, x_local, self.weight, None, self.local_size, "the local hidden size", self.group)
            return CRMSNormFn.apply(x_local, self.weight, self.eps, self.zero_centered_gamma, self.output_scale,
                                     stats_group, grad_group, self.hidden + 1)

        return run_on_local(x, fn, sharded_hidden=sharded, cls=cls, group=self.group, local_hidden=self.local_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parallel={self.parallel!r}, grad_sync={self.grad_sync!r}"
