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

The local math is :mod:`distnorm.functional.layer_norm` (``norm_partial_stats``,
``norm_fwd_with_stats``, ``norm_bwd_partial``, ``norm_bwd_finish``). Weight/bias gradients need
no communication: each rank owns its columns' parameters and sees all tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size, shard_sizes
from distnorm.functional.layer_norm import (
    norm_bwd_finish,
    norm_bwd_partial,
    norm_fwd_with_stats,
    norm_partial_stats,
)
from distnorm.tensor_parallel._common import NormBase, check_inputs, check_normalized_shape, run_on_local, where

__all__ = ["ShardedLayerNorm", "ShardedNorm", "ShardedRMSNorm", "local_shard_size", "sharded_norm"]


def local_shard_size(hidden: int, group: Group, *, cls: str = "sharded norm") -> int:
    """This rank's column count ``shard_sizes(hidden, P)[rank]``; ValueError if a rank would get none."""
    world = group_size(group)
    if world > hidden:
        raise ValueError(
            f"{cls}: a group of size {world} does not fit normalized_shape = {hidden}: every rank needs "
            f"at least one hidden column (group size <= {hidden}) {where(group)}"
        )
    return shard_sizes(hidden, world)[group_rank(group)]


class _ShardedNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                rms: bool, zero_centered_gamma: bool, output_scale: float, group: Group, hidden: int) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        stats = norm_partial_stats(x2d, rms=rms)
        if rms:
            comm.all_reduce_(stats, group)  # [T, 1]: Σx²
            mean = None
            rstd = torch.rsqrt(stats[:, 0] / hidden + eps)
        else:
            n_local = x2d.shape[-1]
            mean_local, m2_local = stats.double().unbind(-1)
            packed = torch.stack([n_local * mean_local, m2_local + n_local * mean_local.square()], dim=-1)
            comm.all_reduce_(packed, group)  # [T, 2] float64: [Σx, Σx²]
            mean64 = packed[:, 0] / hidden
            var = (packed[:, 1] / hidden - mean64.square()).clamp_min(0.0)
            mean, rstd = mean64.to(stats.dtype), torch.rsqrt(var + eps).to(stats.dtype)
        kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
        y = norm_fwd_with_stats(x2d, mean, rstd, weight, bias, **kw)  # type: ignore[arg-type]
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.kw, ctx.group, ctx.hidden, ctx.has_bias = kw, group, hidden, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2d, weight, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        sums, dw, db = norm_bwd_partial(dy2d, x2d, weight, mean, rstd, has_bias=ctx.has_bias, **ctx.kw)
        comm.all_reduce_(sums, ctx.group)  # [T, 2] [Σg, Σg·x_hat] (LayerNorm) or [T, 1] (RMSNorm)
        dx = norm_bwd_finish(dy2d, x2d, weight, mean, rstd, sums, ctx.hidden, **ctx.kw)
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx.view(dy.shape), dw, db, None, None, None, None, None, None


def sharded_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    group: Group,
    hidden: int | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """Norm over a hidden dim split across ``group``.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(hidden, P)[rank]``;
    ``weight``/``bias [H_local]``. ``hidden`` (the full size) is required when P > 1: it cannot be
    read off the local shard without a collective. Collectives (P > 1): fwd 1 all-reduce
    (LayerNorm 16 B/token; RMSNorm 4 B/token, 8 for float64 x); bwd 1 all-reduce (LayerNorm
    8 B/token, RMSNorm 4; doubled for float64 x). ``group`` None or P == 1: none.
    """
    world = group_size(group)
    if hidden is None:
        if world > 1:
            raise ValueError(
                f"sharded_norm: hidden (the full normalized size) is required for a group of size {world}, "
                f"got None {where(group)}"
            )
        hidden = x.shape[-1]
    expected = local_shard_size(hidden, group)
    what = f"this rank's hidden shard shard_sizes({hidden}, {world})[{group_rank(group)}]"
    check_inputs("sharded_norm", x, weight, bias, expected, what, group)
    return _ShardedNormFn.apply(x, weight, bias, eps, rms, zero_centered_gamma, output_scale, group, hidden)


class ShardedNorm(NormBase):
    """Base of the hidden-sharded norms: parameters hold this rank's columns."""

    def __init__(self, cls: str, normalized_shape: object, eps: float, elementwise_affine: bool, bias: bool,
                 **kwargs: Any) -> None:
        group = kwargs["group"]
        hidden = check_normalized_shape(cls, normalized_shape, group)
        super().__init__(cls, hidden, eps, elementwise_affine, bias,
                         local_size=lambda h: local_shard_size(h, group, cls=cls), **kwargs)

    def _norm(self, x: torch.Tensor, rms: bool) -> torch.Tensor:
        cls = type(self).__name__
        world, rank = group_size(self.group), group_rank(self.group)
        what = f"this rank's hidden shard shard_sizes({self.normalized_shape}, {world})[{rank}]"

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            check_inputs(cls, x_local, self.weight, self.bias, self.local_size, what, self.group)
            return _ShardedNormFn.apply(x_local, self.weight, self.bias, self.eps, rms, self.zero_centered_gamma,
                                        self.output_scale, self.group, self.normalized_shape)

        return run_on_local(x, fn, sharded_hidden=True, cls=cls, group=self.group, local_hidden=self.local_size)


class ShardedLayerNorm(ShardedNorm):
    """LayerNorm whose normalized (hidden) dim is split over ``group``; ``weight``/``bias`` sharded alike.

    ``x_shard [*, H_local] -> y_shard [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(H, P)[rank]``
    (or a DTensor ``Shard(-1)`` whose local shard has that size).
    Collectives (P > 1): fwd 1 all-reduce, 16 B/token (float64 ``[Σx, Σx²]`` built from two-pass
    shard moments); bwd 1 all-reduce, 8 B/token (``[Σg, Σg·x_hat]`` fp32; 16 for float64 x).
    ``group`` None or P == 1: none. Stats fp32 (fp64 for fp64 x); accurate at |mean|/std ≥ 1e3.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
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

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True, *,
                 zero_centered_gamma: bool = False, output_scale: float = 1.0, group: Group = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__("ShardedRMSNorm", normalized_shape, eps, elementwise_affine, False,
                         zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, group=group,
                         dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=True)
