"""Hidden-sharded LayerNorm / RMSNorm: the normalized dim split over ``group``, parameters likewise.

Rank ``r`` holds columns ``shard_offsets(H, P)[r] : + shard_sizes(H, P)[r]`` of every token (the
first ``H % P`` ranks one more), and the same slice of ``weight`` / ``bias``. Each call issues
exactly one all-reduce forward and one backward, of per-token statistics only:

* RMSNorm   fwd ``Σx²`` (1 number/token), bwd ``Σg·x_hat`` (1 number/token);
* LayerNorm fwd ``[n_r·m_r, M2_r + n_r·m_r²]`` in float64 (2 numbers/token, 16 B), where
  ``m_r``/``M2_r`` are this rank's two-pass mean and centred sum of squares. Their sums are
  ``[Σx, Σx²]`` with the within-shard part computed without cancellation; the remaining
  ``Σx²/n - mean²`` only cancels the *between-shard* spread, in float64, which costs a relative
  variance error of about ``(mean/std)² · 2⁻⁵³`` — 1e-10 at |mean|/std = 1e3, far below float32
  rounding (a float32 ``E[x²] - E[x]²`` would lose everything there). Bwd ``[Σg, Σg·x_hat]``.

The math and the autograd Function (:class:`distnorm.kernels.ShardedNormFn`) live in
:mod:`distnorm.kernels`. Weight/bias gradients need no communication: each rank owns its columns'
parameters and sees all tokens. With ``group`` None or of size 1 these are the local LayerNorm /
RMSNorm (torch's native kernel, the lean RMSNorm composite, or Triton on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from distnorm.comm import Group, group_rank, group_size
from distnorm.kernels._checks import local_shard_size
from distnorm.kernels.autograd import LayerNormFn, RMSNormFn, ShardedNormFn, sharded_norm
from distnorm.tensor_parallel._common import NormBase, check_inputs, run_on_local

__all__ = ["ShardedLayerNorm", "ShardedNorm", "ShardedRMSNorm", "local_shard_size", "sharded_norm"]

_ShardedNormFn = ShardedNormFn  # the name before the Functions moved to distnorm.kernels


class ShardedNorm(NormBase):
    """Base of the hidden-sharded norms: parameters hold this rank's columns."""

    def __init__(self, cls: str, normalized_shape: object, eps: float, elementwise_affine: bool, bias: bool,
                 **kwargs: Any) -> None:
        super().__init__(cls, normalized_shape, eps, elementwise_affine, bias, sharded=True, **kwargs)

    def _norm(self, x: torch.Tensor, rms: bool) -> torch.Tensor:
        cls = type(self).__name__
        self.check_parameters()
        world, rank = group_size(self.group), group_rank(self.group)
        what = f"this rank's hidden shard shard_sizes({self.hidden}, {world})[{rank}]"
        w, b, zcg, s = self.weight, self.bias, self.zero_centered_gamma, self.output_scale

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            check_inputs(cls, x_local, w, b, self.local_size, what, self.group)
            if world == 1:
                if rms:
                    return RMSNormFn.apply(x_local, w, self.eps, zcg, s)
                return LayerNormFn.apply(x_local, w, b, self.eps, zcg, s)
            return ShardedNormFn.apply(x_local, w, b, self.eps, rms, zcg, s, self.group, self.hidden)

        return run_on_local(x, fn, sharded_hidden=True, cls=cls, group=self.group, local_hidden=self.local_size)


class ShardedLayerNorm(ShardedNorm):
    """LayerNorm whose normalized (hidden) dim is split over ``group``; ``weight``/``bias`` sharded alike.

    ``x_shard [*, H_local] -> y_shard [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(H, P)[rank]``
    (or a DTensor ``Shard(-1)`` whose local shard has that size).
    Collectives (P > 1): fwd 1 all-reduce, 16 B/token (float64 ``[Σx, Σx²]`` built from two-pass
    shard moments); bwd 1 all-reduce, 8 B/token (``[Σg, Σg·x_hat]`` fp32; 16 for float64 x).
    ``group`` None or P == 1: none. Stats fp32 (fp64 for fp64 x); accurate at |mean|/std ≥ 1e3.
    """

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True,
                 *, zero_centered_gamma: bool = False, output_scale: float = 1.0, group: Group = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__("ShardedLayerNorm", normalized_shape, eps, elementwise_affine, bias,
                         zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, group=group,
                         dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=False)


class ShardedRMSNorm(ShardedNorm):
    """RMSNorm whose normalized (hidden) dim is split over ``group``; ``weight`` sharded alike.

    ``x_shard [*, H_local] -> y_shard [*, H_local]`` in ``x.dtype``; ``elementwise_affine=False`` is SRMSNorm.
    Collectives (P > 1): fwd 1 all-reduce, 4 B/token (``Σx²`` fp32; 8 for float64 x); bwd 1
    all-reduce, 4 B/token (``Σg·x_hat``). ``group`` None or P == 1: none.
    """

    has_bias_option = False

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-6, elementwise_affine: bool = True, *,
                 zero_centered_gamma: bool = False, output_scale: float = 1.0, group: Group = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__("ShardedRMSNorm", normalized_shape, eps, elementwise_affine, False,
                         zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, group=group,
                         dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=True)
