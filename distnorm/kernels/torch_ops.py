"""Plain-torch fallbacks of every kernel in :mod:`distnorm.kernels` (same signatures, same errors).

The CPU path: returned statistics float32 (float64 for float64 inputs), outputs in the input's
dtype, ``dw`` / ``db`` in weight's dtype (float32 without a weight). Math runs in torch's own
accumulation type: float32, except float32 inputs on the CPU, which torch's CPU norms accumulate in
float64 (``at::acc_type<float, false>``); matching that keeps the fallback within the "2x torch's
error" rule there. Besides the kernel dtypes these accept float64.
"""

from __future__ import annotations

import torch

from distnorm.kernels._checks import KERNEL_DTYPES, check_2d, check_stats, check_vector, fail

__all__ = [
    "add_rms_norm_bwd",
    "add_rms_norm_fwd",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "norm_bwd_finish",
    "norm_bwd_partial",
    "norm_fwd_with_stats",
    "norm_partial_stats",
    "rms_norm_bwd",
    "rms_norm_fwd",
]

_DTYPES = (*KERNEL_DTYPES, torch.float64)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to torch's accumulation dtype: float64 for float64, and float32 on the CPU; else float32."""
    wide = t.dtype == torch.float64 or (t.dtype == torch.float32 and t.device.type == "cpu")
    return t.double() if wide else t.float()


def _w_eff(weight: torch.Tensor | None, zero_centered_gamma: bool, like: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    w = weight.to(like.dtype)
    return w + 1.0 if zero_centered_gamma else w


def _check_x(x2d: torch.Tensor, where: str) -> tuple[int, int]:
    return check_2d(x2d, "x2d", where, dtypes=_DTYPES)


def _stats(t: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """Statistics as returned: float64 for float64 inputs, else float32."""
    return t if x2d.dtype == torch.float64 else t.float()


def _check_stats(t: torch.Tensor | None, name: str, x2d: torch.Tensor, where: str, width: int | None = None) -> None:
    if x2d.dtype == torch.float64 and isinstance(t, torch.Tensor) and t.dtype == torch.float64:
        t = t.float()  # float64 inputs carry float64 statistics
    check_stats(t, name, x2d.shape[0], x2d.device, where, width=width)


def _apply_affine(
    x_hat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    zero_centered_gamma: bool, output_scale: float,
) -> torch.Tensor:
    w = _w_eff(weight, zero_centered_gamma, x_hat)
    y = x_hat if w is None else x_hat * w
    if bias is not None:
        y = y + bias.to(x_hat.dtype)
    return y * output_scale


def _grads(
    dy: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None, sums_or_none: torch.Tensor | None,
    n_total: int, rstd: torch.Tensor, rms: bool, zero_centered_gamma: bool, output_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, dx_acc, dy_scaled) in the accumulation dtype; sums given = use them (sharded finish)."""
    dy_s = _acc(dy) * output_scale
    w = _w_eff(weight, zero_centered_gamma, dy_s)
    g = dy_s if w is None else dy_s * w
    if sums_or_none is None:
        c_gx = (g * x_hat).sum(-1, keepdim=True) / n_total
        c_g = None if rms else g.sum(-1, keepdim=True) / n_total
    else:
        sums = sums_or_none.to(g.dtype)
        c_gx = sums[:, -1:] / n_total
        c_g = None if rms else sums[:, :1] / n_total
    dx = g - x_hat * c_gx if c_g is None else g - c_g - x_hat * c_gx
    return g, dx * rstd.to(g.dtype)[:, None], dy_s


def _param_grad(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Sum over tokens in float64 (as torch's CPU norms accumulate), cast to weight's dtype (float32 if none)."""
    return t.sum(0, dtype=torch.float64).to(weight.dtype if weight is not None else torch.float32)


def layer_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, mean [T] fp32, rstd [T] fp32)``."""
    where = "layer_norm_fwd"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    check_vector(bias, "bias", n, x2d.device, where)
    x = _acc(x2d)
    mean = x.mean(-1)
    rstd = torch.rsqrt((x - mean[:, None]).square().mean(-1) + eps)
    x_hat = (x - mean[:, None]) * rstd[:, None]
    y = _apply_affine(x_hat, weight, bias, zero_centered_gamma, output_scale)
    return y.to(x2d.dtype), _stats(mean, x2d), _stats(rstd, x2d)


def layer_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0, has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None, db [N] | None)``."""
    where = "layer_norm_bwd"
    _, n = _check_x(x2d, where)
    check_2d(dy, "dy", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    check_vector(weight, "weight", n, x2d.device, where)
    _check_stats(mean, "mean", x2d, where)
    _check_stats(rstd, "rstd", x2d, where)
    x = _acc(x2d)
    x_hat = (x - mean.to(x.dtype)[:, None]) * rstd.to(x.dtype)[:, None]
    _, dx, dy_s = _grads(dy, x_hat, weight, None, n, rstd, False, zero_centered_gamma, output_scale)
    dw = _param_grad(dy_s * x_hat, weight) if weight is not None else None
    db = _param_grad(dy_s, weight) if has_bias else None
    return dx.to(dy.dtype), dw, db


def rms_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, rstd [T] fp32)``."""
    where = "rms_norm_fwd"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    x = _acc(x2d)
    rstd = torch.rsqrt(x.square().mean(-1) + eps)
    y = _apply_affine(x * rstd[:, None], weight, None, zero_centered_gamma, output_scale)
    return y.to(x2d.dtype), _stats(rstd, x2d)


def rms_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None)``."""
    where = "rms_norm_bwd"
    _, n = _check_x(x2d, where)
    check_2d(dy, "dy", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    check_vector(weight, "weight", n, x2d.device, where)
    _check_stats(rstd, "rstd", x2d, where)
    x = _acc(x2d)
    x_hat = x * rstd.to(x.dtype)[:, None]
    _, dx, dy_s = _grads(dy, x_hat, weight, None, n, rstd, True, zero_centered_gamma, output_scale)
    dw = _param_grad(dy_s * x_hat, weight) if weight is not None else None
    return dx.to(dy.dtype), dw


def add_rms_norm_fwd(
    x2d: torch.Tensor, residual2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``(y x.dtype, residual_out residual.dtype, rstd [T] fp32)``."""
    where = "add_rms_norm_fwd"
    _check_x(x2d, where)
    if residual2d is None:
        fail(ValueError, where, "residual2d", None, "a [T, N] tensor")
    check_2d(residual2d, "residual2d", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    residual_out = (_acc(x2d) + _acc(residual2d)).to(residual2d.dtype)
    y, rstd = rms_norm_fwd(residual_out, weight, eps, zero_centered_gamma=zero_centered_gamma,
                           output_scale=output_scale)
    return y.to(x2d.dtype), residual_out, rstd


def add_rms_norm_bwd(
    dy: torch.Tensor, dresidual_out: torch.Tensor | None, residual_out: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`add_rms_norm_fwd`: ``(dx (= dresidual) [T, N] dy.dtype, dw | None)``."""
    if dresidual_out is not None:
        check_2d(dresidual_out, "dresidual_out", "add_rms_norm_bwd", like=dy, same_dtype=False, dtypes=_DTYPES)
    dx, dw = rms_norm_bwd(dy, residual_out, weight, rstd, zero_centered_gamma=zero_centered_gamma,
                          output_scale=output_scale)
    if dresidual_out is not None:
        dx = (_acc(dx) + _acc(dresidual_out)).to(dy.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# sharded pieces (see distnorm.kernels.sharded for the protocol)


def norm_partial_stats(x2d: torch.Tensor, *, rms: bool) -> torch.Tensor:
    """``x2d [T, H_local] -> [T, 1]`` (Σx²) or ``[T, 2]`` (local mean, local M2), float32."""
    _check_x(x2d, "norm_partial_stats")
    x = _acc(x2d)
    if rms:
        return _stats(x.square().sum(-1, keepdim=True), x2d)
    mean = x.mean(-1, keepdim=True)
    return _stats(torch.cat([mean, (x - mean).square().sum(-1, keepdim=True)], dim=-1), x2d)


def norm_fwd_with_stats(
    x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """Normalise with externally reduced ``mean`` (None = RMSNorm) and ``rstd``: ``y`` in x's dtype."""
    where = "norm_fwd_with_stats"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    check_vector(bias, "bias", n, x2d.device, where)
    _check_stats(rstd, "rstd", x2d, where)
    x = _acc(x2d)
    if mean is not None:
        _check_stats(mean, "mean", x2d, where)
        x = x - mean.to(x.dtype)[:, None]
    y = _apply_affine(x * rstd.to(x.dtype)[:, None], weight, bias, zero_centered_gamma, output_scale)
    return y.to(x2d.dtype)


def _x_hat(x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, where: str) -> torch.Tensor:
    _check_stats(rstd, "rstd", x2d, where)
    x = _acc(x2d)
    if mean is not None:
        _check_stats(mean, "mean", x2d, where)
        x = x - mean.to(x.dtype)[:, None]
    return x * rstd.to(x.dtype)[:, None]


def norm_bwd_partial(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0, has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(sums fp32 [T, 2] (Σg, Σg·x̂) | [T, 1] (Σg·x̂), dw | None, db | None)`` of this shard."""
    where = "norm_bwd_partial"
    _, n = _check_x(x2d, where)
    check_2d(dy, "dy", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    check_vector(weight, "weight", n, x2d.device, where)
    x_hat = _x_hat(x2d, mean, rstd, where)
    dy_s = _acc(dy) * output_scale
    w = _w_eff(weight, zero_centered_gamma, dy_s)
    g = dy_s if w is None else dy_s * w
    gx = (g * x_hat).sum(-1, keepdim=True)
    sums = gx if mean is None else torch.cat([g.sum(-1, keepdim=True), gx], dim=-1)
    dw = _param_grad(dy_s * x_hat, weight) if weight is not None else None
    db = _param_grad(dy_s, weight) if has_bias and mean is not None else None
    return _stats(sums, x2d), dw, db


def norm_bwd_finish(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, sums: torch.Tensor, n_total: int, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> torch.Tensor:
    """``dx [T, H_local]`` in dy's dtype from the all-reduced ``sums`` over ``n_total`` elements."""
    where = "norm_bwd_finish"
    _, n = _check_x(x2d, where)
    check_2d(dy, "dy", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    check_vector(weight, "weight", n, x2d.device, where)
    if not isinstance(n_total, int) or isinstance(n_total, bool) or n_total < n:
        fail(ValueError, where, "n_total", n_total, f"an int >= x2d.shape[1] = {n} (the full hidden size)")
    _check_stats(sums, "sums", x2d, where, width=1 if mean is None else 2)
    x_hat = _x_hat(x2d, mean, rstd, where)
    _, dx, _ = _grads(dy, x_hat, weight, sums, n_total, rstd, mean is None, zero_centered_gamma, output_scale)
    return dx.to(dy.dtype)
