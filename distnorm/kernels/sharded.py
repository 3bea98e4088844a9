"""Triton pieces of the hidden-sharded norms: partial statistics in, finish with reduced ones.

A norm whose normalized dim ``H`` is split over ``P`` ranks (``H_local = shard_sizes(H, P)[rank]``)
runs, per direction, *partial kernel -> one all-reduce (by the caller) -> finish kernel*::

    forward   norm_partial_stats(x_shard)                    RMSNorm: [T, 1] Σx²
                                                             LayerNorm: [T, 2] (local mean, local M2)
              -> caller all-reduces / merges into mean, rstd (float32 [T])
              norm_fwd_with_stats(x_shard, mean, rstd, w_shard, b_shard) -> y_shard
    backward  norm_bwd_partial(dy, x_shard, w_shard, mean, rstd) -> (sums, dw_shard, db_shard)
                                                             RMSNorm: [T, 1] Σg·x̂
                                                             LayerNorm: [T, 2] (Σg, Σg·x̂)
              -> caller all-reduces sums (SUM)
              norm_bwd_finish(dy, x_shard, w_shard, mean, rstd, sums, n_total=H) -> dx_shard

with ``g = dy * w_eff * output_scale``. LayerNorm's partial statistics are the shard's own mean
and centred sum of squares (not Σx, Σx²) so the caller can merge them without cancellation
(Chan et al.: ``M2 = Σ M2_r + Σ n_r (mean_r - mean)^2``) even when ``|mean| / std >= 1e3``.
The forward-with-stats and backward kernels are the ones in :mod:`distnorm.kernels.norm`
(``STATS_GIVEN``, ``STORE_SUMS``, ``SUMS_GIVEN``); this file adds the statistics kernel.
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from distnorm.kernels._checks import check_2d, check_stats, fail
from distnorm.kernels.norm import _check_device, _tile, launch_guard, norm_bwd, norm_fwd

__all__ = ["norm_bwd_finish", "norm_bwd_partial", "norm_fwd_with_stats", "norm_partial_stats"]


@triton.jit
def _partial_stats_kernel(
    X, STATS, stride_x_row, M, N,
    IS_RMS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """STATS[M, 1] = Σx² (RMSNorm) or STATS[M, 2] = (mean, Σ(x - mean)²) (LayerNorm), float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS_NORM:
        tl.store(STATS + rows, tl.sum(x * x, axis=1), mask=row_mask)
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(STATS + rows * 2, mean, mask=row_mask)
        tl.store(STATS + rows * 2 + 1, tl.sum(xc * xc, axis=1), mask=row_mask)


def norm_partial_stats(x2d: torch.Tensor, *, rms: bool) -> torch.Tensor:
    """Per-token statistics of this rank's hidden shard, float32.

    ``x2d [T, H_local] -> [T, 1]`` (Σx², RMSNorm) or ``[T, 2]`` (local mean, local M2 =
    Σ(x - mean_local)², LayerNorm). Reads x once.
    """
    where = "norm_partial_stats"
    t, n = check_2d(x2d, "x2d", where)
    _check_device(x2d, where)
    block_m, block_n, num_warps = _tile(n, x2d.dtype, where)
    stats = torch.empty((t, 1 if rms else 2), dtype=torch.float32, device=x2d.device)
    if t > 0:
        with launch_guard():
            _partial_stats_kernel[(triton.cdiv(t, block_m),)](
                x2d, stats, x2d.stride(0), t, n,
                IS_RMS_NORM=rms, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )
    return stats


def norm_fwd_with_stats(
    x2d: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """Normalise with externally reduced statistics: ``y [T, H_local]`` in x's dtype.

    ``mean`` (float32 ``[T]``; None = RMSNorm) and ``rstd`` (float32 ``[T]``) are the global ones.
    ``y = ((x - mean) * rstd * w_eff + b) * output_scale``.
    """
    where = "norm_fwd_with_stats"
    if rstd is None:
        fail(ValueError, where, "rstd", None, "the reduced float32 [T] rstd")
    y, _, _, _ = norm_fwd(x2d, weight, bias, 0.0, rms=mean is None, mean=mean, rstd=rstd,
                          zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, where=where)
    return y


def norm_bwd_partial(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward, first half: ``(sums, dw_shard | None, db_shard | None)``.

    ``sums`` float32 ``[T, 2]`` (Σg, Σg·x̂ over this shard; LayerNorm, ``mean`` given) or
    ``[T, 1]`` (Σg·x̂; RMSNorm, ``mean`` None). ``dw`` / ``db`` (LayerNorm with ``has_bias``) are
    complete: they need no reduction over the hidden split. Reads x, dy, w once.
    """
    _, dw, db, sums = norm_bwd(dy, x2d, weight, mean, rstd, compute_dw=weight is not None,
                               compute_db=has_bias and mean is not None, store_dx=False, store_sums=True,
                               zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                               where="norm_bwd_partial")
    return cast(torch.Tensor, sums), dw, db


def norm_bwd_finish(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    sums: torch.Tensor,
    n_total: int,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """Backward, second half: ``dx [T, H_local]`` in dy's dtype from the reduced ``sums``.

    RMSNorm: ``dx = rstd * (g - x̂ * Σg·x̂ / n_total)``; LayerNorm:
    ``dx = rstd * (g - Σg / n_total - x̂ * Σg·x̂ / n_total)``; ``n_total`` = the full hidden size.
    """
    where = "norm_bwd_finish"
    if not isinstance(n_total, int) or isinstance(n_total, bool) or n_total < x2d.shape[-1]:
        fail(ValueError, where, "n_total", n_total, f"an int >= x2d.shape[1] = {x2d.shape[-1]} (the full hidden size)")
    check_stats(sums, "sums", x2d.shape[0], x2d.device, where, width=1 if mean is None else 2)
    dx, _, _, _ = norm_bwd(dy, x2d, weight, mean, rstd, compute_dw=False, compute_db=False, sums=sums,
                           n_total=n_total, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                           where=where)
    return cast(torch.Tensor, dx)
