"""LayerNorm / RMSNorm: the local math (torch), and the functional API with an optional hidden-sharding group.

The local math is a small set of functions on 2-D tensors ``x2d [T, H_local]`` that the autograd
Functions of :mod:`distnorm.tensor_parallel` call and nothing else, so a Triton kernel with the same
signature can replace any of them by a one-line dispatch on ``x2d.device``:

* whole-row (one device, or sequence parallel): ``layer_norm_fwd`` / ``layer_norm_bwd``,
  ``rms_norm_fwd`` / ``rms_norm_bwd``;
* hidden-sharded pieces: ``norm_partial_stats`` (before the forward all-reduce),
  ``norm_fwd_with_stats`` (after it), ``norm_bwd_partial`` (before the backward all-reduce),
  ``norm_bwd_finish`` (after it). ``mean=None`` selects RMSNorm.

Math (w = weight, +1 if ``zero_centered_gamma``; s = ``output_scale``)::

    LayerNorm  x_hat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps),   y = (x_hat * w + b) * s
    RMSNorm    x_hat = x * rstd,            rstd = 1 / sqrt(mean(x^2) + eps), y = x_hat * w * s
    backward   g = dy * w * s
               LayerNorm dx = rstd * (g - sum(g)/n - x_hat * sum(g * x_hat)/n)
               RMSNorm   dx = rstd * (g - x_hat * sum(g * x_hat)/n)
               dw = sum_T dy * x_hat * s,  db = sum_T dy * s

``n`` is the full hidden size; in the sharded case the per-token sums run over all shards.
Statistics (mean, rstd, the sums) and the weight/bias gradients are float32, or float64 for float64
inputs (the caller reduces dw/db over ranks and casts them to the parameter dtype once); outputs
come back in ``x2d.dtype``.
"""

from __future__ import annotations

import torch

from distnorm.comm import Group, group_size

__all__ = [
    "layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "norm_bwd_finish",
    "norm_bwd_partial",
    "norm_fwd_with_stats",
    "norm_partial_stats",
    "rms_norm",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "stats_dtype",
]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gain(weight: torch.Tensor | None, zero_centered_gamma: bool, output_scale: float,
          dtype: torch.dtype) -> torch.Tensor | float:
    """The per-column multiplier of ``x_hat``: ``(weight (+1)) * output_scale`` (a float without weight)."""
    if weight is None:
        return output_scale
    w = weight.to(dtype)
    if zero_centered_gamma:
        w = w + 1.0
    return w * output_scale if output_scale != 1.0 else w


def _x_hat(x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor) -> torch.Tensor:
    xf = x2d.to(rstd.dtype)
    if mean is not None:
        xf = xf - mean.unsqueeze(-1)
    return xf * rstd.unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Hidden-sharded pieces (also the building blocks of the whole-row functions)
# --------------------------------------------------------------------------------------------


def _norm_partial_stats_torch(x2d: torch.Tensor, *, rms: bool) -> torch.Tensor:
    """Per-token statistics of this rank's columns, before the cross-shard exchange.

    ``x2d [T, H_local] -> [T, 1]`` (``Σx²``) for RMSNorm, ``[T, 2]`` (local mean, local
    ``M2 = Σ(x - mean_local)²``, two-pass with a compensated mean) for LayerNorm. float32
    (float64 for float64 inputs). The mean is the correctly rounded one even at |mean|/std ≥ 1e3,
    where a plain fp32 mean is off by up to an ulp of |mean| — which x_hat sees as ulp(|mean|)/std.
    """
    xf = x2d.to(stats_dtype(x2d.dtype))
    if rms:
        return xf.square().sum(dim=-1, keepdim=True)
    mean_hi = xf.mean(dim=-1, keepdim=True)
    # Second pass around mean_hi: x - mean_hi is exact where it matters (|mean| >> std, Sterbenz),
    # so the residual mean c corrects mean_hi to the correctly rounded mean, and M2 loses nothing.
    d = xf - mean_hi
    c = d.mean(dim=-1, keepdim=True)
    m2 = d.square().sum(dim=-1, keepdim=True) - c.square() * x2d.shape[-1]
    return torch.cat([mean_hi + c, m2.clamp_min(0.0)], dim=-1)


def _norm_fwd_with_stats_torch(
    x2d: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """Normalise with given statistics. ``x2d [T, H_local]``, ``mean``/``rstd [T]`` -> ``y [T, H_local]`` in ``x2d.dtype``."""
    x_hat = _x_hat(x2d, mean, rstd)
    y = x_hat * _gain(weight, zero_centered_gamma, output_scale, rstd.dtype)
    if bias is not None:
        y = y + bias.to(rstd.dtype) * output_scale
    return y.to(x2d.dtype)


def _norm_bwd_partial_torch(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    has_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token backward sums of this rank's columns, and the (local) weight/bias gradients.

    ``dy, x2d [T, H_local] -> sums [T, 2]`` (``Σg``, ``Σg·x_hat``) for LayerNorm or ``[T, 1]``
    (``Σg·x_hat``) for RMSNorm; ``dw [H_local]`` (None without weight) and ``db [H_local]`` (None
    unless ``has_bias``), summed over this rank's tokens. All in the stats dtype: the caller reduces
    them over ranks if needed and casts to the parameter dtype once.
    """
    ct = rstd.dtype
    x_hat = _x_hat(x2d, mean, rstd)
    dyf = dy.to(ct)
    g = dyf * _gain(weight, zero_centered_gamma, output_scale, ct)
    gx = (g * x_hat).sum(dim=-1, keepdim=True)
    sums = gx if mean is None else torch.cat([g.sum(dim=-1, keepdim=True), gx], dim=-1)
    dw = db = None
    if weight is not None:
        dw = (dyf * x_hat).sum(dim=0) * output_scale
    if has_bias:
        db = dyf.sum(dim=0) * output_scale
    return sums, dw, db


def _norm_bwd_finish_torch(
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
    """Input gradient from the (all-reduced) per-token ``sums`` over the full hidden size ``n_total``.

    ``dy, x2d [T, H_local]``, ``sums [T, 2 | 1]`` -> ``dx [T, H_local]`` in ``x2d.dtype``.
    """
    ct = rstd.dtype
    x_hat = _x_hat(x2d, mean, rstd)
    g = dy.to(ct) * _gain(weight, zero_centered_gamma, output_scale, ct)
    sums = sums.to(ct) / n_total
    if mean is None:
        dx = g - x_hat * sums[:, 0:1]
    else:
        dx = g - sums[:, 0:1] - x_hat * sums[:, 1:2]
    return (dx * rstd.unsqueeze(-1)).to(x2d.dtype)


# --------------------------------------------------------------------------------------------
# Whole-row local math
# --------------------------------------------------------------------------------------------


def _layer_norm_fwd_torch(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of whole rows. ``x2d [T, H] -> (y [T, H] in x2d.dtype, mean [T], rstd [T])``, two-pass stats."""
    stats = _norm_partial_stats_torch(x2d, rms=False)
    mean = stats[:, 0]
    rstd = torch.rsqrt(stats[:, 1] / x2d.shape[-1] + eps)
    y = _norm_fwd_with_stats_torch(x2d, mean, rstd, weight, bias,
                            zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
    return y, mean, rstd


def _layer_norm_bwd_torch(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward of whole rows: ``(dx [T, H] in x2d.dtype, dw [H] | None, db [H] | None)``, dw/db in the stats dtype."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    sums, dw, db = _norm_bwd_partial_torch(dy, x2d, weight, mean, rstd, has_bias=has_bias, **kw)  # type: ignore[arg-type]
    dx = _norm_bwd_finish_torch(dy, x2d, weight, mean, rstd, sums, x2d.shape[-1], **kw)  # type: ignore[arg-type]
    return dx, dw, db


def _rms_norm_fwd_torch(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of whole rows. ``x2d [T, H] -> (y [T, H] in x2d.dtype, rstd [T])``."""
    rstd = torch.rsqrt(_norm_partial_stats_torch(x2d, rms=True)[:, 0] / x2d.shape[-1] + eps)
    y = _norm_fwd_with_stats_torch(x2d, None, rstd, weight, None,
                            zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
    return y, rstd


def _rms_norm_bwd_torch(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward of whole rows: ``(dx [T, H] in x2d.dtype, dw [H] | None)``, dw in the stats dtype."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    sums, dw, _ = _norm_bwd_partial_torch(dy, x2d, weight, None, rstd, **kw)  # type: ignore[arg-type]
    dx = _norm_bwd_finish_torch(dy, x2d, weight, None, rstd, sums, x2d.shape[-1], **kw)  # type: ignore[arg-type]
    return dx, dw


# --------------------------------------------------------------------------------------------
# Dispatch: CUDA tensors go to the Triton kernels (distnorm.kernels) when they can run there;
# everything else runs the torch math above. backend="torch" | "triton" forces a path per call.
# --------------------------------------------------------------------------------------------


def _use_triton(x2d: torch.Tensor, backend: str, where: str) -> bool:
    if backend == "torch":
        return False
    if backend == "auto" and not x2d.is_cuda:
        return False  # no import of distnorm.kernels (nor Triton) on the CPU path
    from distnorm import kernels

    return kernels.resolve_backend(x2d, backend, where=where) == "triton"  # type: ignore[arg-type]


def _stats_cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(stats_dtype(like.dtype))


def norm_partial_stats(x2d: torch.Tensor, *, rms: bool, backend: str = "auto") -> torch.Tensor:
    """Per-token statistics of this rank's columns; see :func:`_norm_partial_stats_torch` (shapes, dtypes)."""
    if _use_triton(x2d, backend, "norm_partial_stats"):
        from distnorm import kernels

        return kernels.norm_partial_stats(x2d, rms=rms, backend="triton")
    return _norm_partial_stats_torch(x2d, rms=rms)


def norm_fwd_with_stats(x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, *, zero_centered_gamma: bool = False,
                        output_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Normalise with given statistics; see :func:`_norm_fwd_with_stats_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if _use_triton(x2d, backend, "norm_fwd_with_stats"):
        from distnorm import kernels

        return kernels.norm_fwd_with_stats(x2d, mean, rstd, weight, bias, backend="triton", **kw)  # type: ignore[arg-type]
    return _norm_fwd_with_stats_torch(x2d, mean, rstd, weight, bias, **kw)  # type: ignore[arg-type]


def norm_bwd_partial(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                     rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
                     has_bias: bool = False, backend: str = "auto",
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token backward sums and local dw/db (stats dtype); see :func:`_norm_bwd_partial_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale, "has_bias": has_bias}
    if _use_triton(x2d, backend, "norm_bwd_partial"):
        from distnorm import kernels

        sums, dw, db = kernels.norm_bwd_partial(dy, x2d, weight, mean, rstd, backend="triton", **kw)  # type: ignore[arg-type]
        return sums, _stats_cast(dw, x2d), _stats_cast(db, x2d)
    return _norm_bwd_partial_torch(dy, x2d, weight, mean, rstd, **kw)  # type: ignore[arg-type]


def norm_bwd_finish(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                    rstd: torch.Tensor, sums: torch.Tensor, n_total: int, *, zero_centered_gamma: bool = False,
                    output_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Input gradient from the reduced ``sums``; see :func:`_norm_bwd_finish_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if _use_triton(x2d, backend, "norm_bwd_finish"):
        from distnorm import kernels

        return kernels.norm_bwd_finish(dy, x2d, weight, mean, rstd, sums, n_total, backend="triton", **kw)  # type: ignore[arg-type]
    return _norm_bwd_finish_torch(dy, x2d, weight, mean, rstd, sums, n_total, **kw)  # type: ignore[arg-type]


def layer_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                   zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: str = "auto",
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of whole rows; see :func:`_layer_norm_fwd_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if _use_triton(x2d, backend, "layer_norm_fwd"):
        from distnorm import kernels

        return kernels.layer_norm_fwd(x2d, weight, bias, eps, backend="triton", **kw)  # type: ignore[arg-type]
    return _layer_norm_fwd_torch(x2d, weight, bias, eps, **kw)  # type: ignore[arg-type]


def layer_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
                   has_bias: bool = True, backend: str = "auto",
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward of whole rows (dw/db in the stats dtype); see :func:`_layer_norm_bwd_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale, "has_bias": has_bias}
    if _use_triton(x2d, backend, "layer_norm_bwd"):
        from distnorm import kernels

        dx, dw, db = kernels.layer_norm_bwd(dy, x2d, weight, mean, rstd, backend="triton", **kw)  # type: ignore[arg-type]
        return dx, _stats_cast(dw, x2d), _stats_cast(db, x2d)
    return _layer_norm_bwd_torch(dy, x2d, weight, mean, rstd, **kw)  # type: ignore[arg-type]


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *, zero_centered_gamma: bool = False,
                 output_scale: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of whole rows; see :func:`_rms_norm_fwd_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if _use_triton(x2d, backend, "rms_norm_fwd"):
        from distnorm import kernels

        return kernels.rms_norm_fwd(x2d, weight, eps, backend="triton", **kw)  # type: ignore[arg-type]
    return _rms_norm_fwd_torch(x2d, weight, eps, **kw)  # type: ignore[arg-type]


def rms_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *,
                 zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: str = "auto",
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward of whole rows (dw in the stats dtype); see :func:`_rms_norm_bwd_torch`."""
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if _use_triton(x2d, backend, "rms_norm_bwd"):
        from distnorm import kernels

        dx, dw = kernels.rms_norm_bwd(dy, x2d, weight, rstd, backend="triton", **kw)  # type: ignore[arg-type]
        return dx, _stats_cast(dw, x2d)
    return _rms_norm_bwd_torch(dy, x2d, weight, rstd, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group: Group = None,
    hidden: int | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """LayerNorm over the last dim, hidden-sharded over ``group`` when it has more than one rank.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``; ``weight``/``bias [H_local]`` are this
    rank's shards, ``H_local = shard_sizes(hidden, P)[rank]``; ``hidden`` (the full size) is
    required when P > 1. Collectives (P > 1): fwd 1 all-reduce,
    16 B/token (float64 [n·mean, M2 + n·mean²]); bwd 1 all-reduce, 8 B/token (fp32 [Σg, Σg·x_hat];
    16 for float64 inputs). ``group`` None or P == 1: none.
    """
    from distnorm.tensor_parallel.sequence_parallel import local_norm
    from distnorm.tensor_parallel.sharded import sharded_norm

    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if group_size(group) > 1:
        return sharded_norm(x, weight, bias, eps, rms=False, group=group, hidden=hidden, **kw)  # type: ignore[arg-type]
    return local_norm(x, weight, bias, eps, rms=False, **kw)  # type: ignore[arg-type]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    group: Group = None,
    hidden: int | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """RMSNorm over the last dim, hidden-sharded over ``group`` when it has more than one rank.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(hidden, P)[rank]``
    (``hidden`` required when P > 1). Collectives (P > 1): fwd 1 all-reduce,
    4 B/token (Σx², fp32; 8 for float64 inputs); bwd 1 all-reduce, 4 B/token (Σg·x_hat).
    ``group`` None or P == 1: none.
    """
    from distnorm.tensor_parallel.sequence_parallel import local_norm
    from distnorm.tensor_parallel.sharded import sharded_norm

    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    if group_size(group) > 1:
        return sharded_norm(x, weight, None, eps, rms=True, group=group, hidden=hidden, **kw)  # type: ignore[arg-type]
    return local_norm(x, weight, None, eps, rms=True, **kw)  # type: ignore[arg-type]
