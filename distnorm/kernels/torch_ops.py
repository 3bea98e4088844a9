"""The torch implementation of every local norm launcher (same signatures and errors as the Triton ones).

One implementation serves CPU tensors, float64, rows too wide for the kernels and ``backend="torch"``.
It keeps the precision contract of ``docs/precision.md``: statistics in the stats dtype (float32;
float64 for float64 inputs), outputs in the input's dtype, ``dw`` / ``db`` returned in the stats
dtype (the autograd Functions sum them over ranks, then cast once to the parameter dtype).

How it is fast:

* Whole-row LayerNorm is torch's fused native kernel (``torch.native_layer_norm`` /
  ``aten.native_layer_norm_backward``), called with gamma/beta in the stats dtype: with bf16/fp16
  activations that is torch's mixed-dtype layer norm, which returns float32 mean/rstd (with bf16
  gamma it would round them to bf16) and is also the faster CPU kernel. Its backward accumulates
  dgamma/dbeta in a buffer of the *input's* dtype, though (``layer_norm_kernel.cpp``; bf16 at
  2048 x 1024: ~25% off), so for 16-bit inputs dx comes from it and dgamma/dbeta from its float32
  kernel run on float32 copies of row chunks (:func:`_native_param_grads`). CUDA's native kernel
  has no mixed-dtype path, so 16-bit CUDA tensors that reach here take the composite below.
* torch 2.13 has no fused RMSNorm on the CPU (``aten._fused_rms_norm`` is a CompositeImplicit
  forward; its backward has no CPU kernel), so RMSNorm and the hidden-sharded pieces are composites
  written to allocate as few ``[T, N]`` temporaries as possible: one working copy in the stats
  dtype, updated in place. On the 2-core CPU this project is measured on, a fresh 8 MiB buffer
  costs several times the arithmetic done in it (``nn.RMSNorm``'s composite allocates about ten).
* Nothing is saved here: the autograd Functions keep only ``x``, the parameters and the per-row
  statistics, and the backward recomputes ``x_hat``.
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
    "stats_dtype",
]

_DTYPES = (*KERNEL_DTYPES, torch.float64)
_aten = torch.ops.aten


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and parameter gradients are kept in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# checks and small helpers


def _check_x(x2d: torch.Tensor, where: str) -> tuple[int, int]:
    return check_2d(x2d, "x2d", where, dtypes=_DTYPES)


def _check_dy(dy: torch.Tensor, x2d: torch.Tensor, where: str) -> None:
    check_2d(dy, "dy", where, like=x2d, same_dtype=False, dtypes=_DTYPES)


def _check_stats(t: torch.Tensor | None, name: str, x2d: torch.Tensor, where: str, width: int | None = None) -> None:
    if x2d.dtype == torch.float64 and isinstance(t, torch.Tensor) and t.dtype == torch.float64:
        t = t.float()  # float64 inputs carry float64 statistics
    check_stats(t, name, x2d.shape[0], x2d.device, where, width=width)


def _gain(weight: torch.Tensor | None, zero_centered_gamma: bool, output_scale: float,
          ct: torch.dtype) -> torch.Tensor | float:
    """The per-column multiplier of ``x_hat`` in ``ct``: ``(weight (+1)) * output_scale``; a float without weight."""
    if weight is None:
        return output_scale
    w = weight if weight.dtype == ct else weight.to(ct)
    if zero_centered_gamma:
        w = w + 1.0
    return w * output_scale if output_scale != 1.0 else w


def _gamma(weight: torch.Tensor | None, zero_centered_gamma: bool, output_scale: float, n: int,
           x2d: torch.Tensor) -> torch.Tensor:
    """:func:`_gain` as a ``[N]`` tensor (ones * output_scale without weight): native LayerNorm picks its
    mixed-dtype path (and float32 statistics) only when it is given a float32 gamma."""
    gain = _gain(weight, zero_centered_gamma, output_scale, stats_dtype(x2d.dtype))
    if isinstance(gain, torch.Tensor):
        return gain
    return torch.full((n,), gain, dtype=stats_dtype(x2d.dtype), device=x2d.device)


def _native_layer_norm(x2d: torch.Tensor) -> bool:
    """torch's fused LayerNorm takes float32 gamma with 16-bit input on the CPU only."""
    return x2d.is_cpu or x2d.dtype == stats_dtype(x2d.dtype)


def _work(x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor) -> torch.Tensor:
    """A fresh stats-dtype copy of ``x2d`` normalised in place: ``x_hat = (x - mean) * rstd``."""
    xf = x2d.to(rstd.dtype, copy=True)
    if mean is not None:
        xf.sub_(mean.to(rstd.dtype).unsqueeze(-1))
    return xf.mul_(rstd.unsqueeze(-1))


def _finish_y(x_hat: torch.Tensor, gain: torch.Tensor | float, bias: torch.Tensor | None, output_scale: float,
              dtype: torch.dtype) -> torch.Tensor:
    """``y = x_hat * gain + bias * output_scale`` in place on ``x_hat``, returned in ``dtype``."""
    if bias is not None:  # x_hat * gain + b in one pass
        b = bias if bias.dtype == x_hat.dtype else bias.to(x_hat.dtype)
        b = b * output_scale if output_scale != 1.0 else b
        if isinstance(gain, torch.Tensor):
            torch.addcmul(b, x_hat, gain, out=x_hat)
        else:
            x_hat.mul_(gain).add_(b)
    elif isinstance(gain, torch.Tensor) or gain != 1.0:
        x_hat.mul_(gain)
    return x_hat if x_hat.dtype == dtype else x_hat.to(dtype)


def _sumsq(xf: torch.Tensor) -> torch.Tensor:
    """``Σ x²`` per row of a stats-dtype tensor, ``[T]``, without a ``[T, N]`` temporary.

    ``vecdot`` sums products as accurately as ``x.square().sum(-1)`` (~1 ulp); ``vector_norm``
    squared back is ~3 ulp, which the fp32 outputs would carry past the "≤ 2× torch's error" rule.
    """
    return torch.linalg.vecdot(xf, xf)


def _rms_rstd(x_work: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` per row of a stats-dtype tensor: ``[T]``."""
    return _sumsq(x_work).div_(n).add_(eps).rsqrt_()


def _row_sums(prod: torch.Tensor, gain: torch.Tensor | float) -> torch.Tensor:
    """``Σ_cols prod * gain`` per row: a matrix-vector product with a weight, a row sum without."""
    if isinstance(gain, torch.Tensor):
        return torch.mv(prod, gain)
    return prod.sum(-1).mul_(gain)


def _bwd_core(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
    rstd: torch.Tensor, zero_centered_gamma: bool, output_scale: float, *, sums: torch.Tensor | None,
    n_total: int, want_dx: bool, want_dw: bool, want_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Shared backward: ``(dx | None, row sums [T, 2 | 1], dw | None, db | None)``, one ``x_hat`` pass.

    ``g = dy * gain``; row sums are ``(Σg, Σg·x_hat)`` (LayerNorm) or ``Σg·x_hat`` (RMSNorm) over
    these columns; ``sums`` given (already reduced over a hidden dim of ``n_total``) replace them in
    ``dx = rstd * (g - Σg/n - x_hat * Σg·x_hat/n)``. Temporaries: ``x_hat``, ``dy * x_hat`` (reused
    for ``dx``) and, for 16-bit dy, one stats-dtype copy of dy.
    """
    ct = rstd.dtype
    gain = _gain(weight, zero_centered_gamma, output_scale, ct)
    x_hat = _work(x2d, mean, rstd)
    dyf = dy if dy.dtype == ct else dy.to(ct)
    prod = dyf * x_hat if want_dw or sums is None else None  # dy * x_hat: dW and the local Σg·x_hat
    dw = prod.sum(0).mul_(output_scale) if prod is not None and want_dw else None
    db = dyf.sum(0).mul_(output_scale) if want_db else None
    if sums is None:
        s_gx = _row_sums(prod, gain)  # type: ignore[arg-type]
        local = s_gx.unsqueeze(-1) if mean is None else torch.stack([_row_sums(dyf, gain), s_gx], dim=-1)
    else:
        local = sums if sums.dtype == ct else sums.to(ct)
    if not want_dx:
        return None, local, dw, db
    g = dyf * gain if prod is None else torch.mul(dyf, gain, out=prod)  # prod is no longer needed: reuse it
    g.addcmul_(x_hat, local[:, -1:], value=-1.0 / n_total)
    if mean is not None:
        g.sub_(local[:, :1] / n_total)
    dx = g.mul_(rstd.unsqueeze(-1))
    return dx.to(dy.dtype), local, dw, db


# ----------------------------------------------------------------------------------------------
# whole rows


_CHUNK_ELEMENTS = 1 << 19  # 2 MiB of float32 per buffer: stays in cache and is not returned to the OS


def _native_param_grads(
    dy: torch.Tensor, x2d: torch.Tensor, mean2d: torch.Tensor, rstd2d: torch.Tensor, gamma: torch.Tensor,
    want: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm ``(dgamma, dbeta)`` of 16-bit ``dy``, ``x2d`` accumulated in float32: torch's native
    backward on float32 copies of row chunks (two reused chunk buffers), the partial sums added in float32.

    torch's CPU LayerNorm backward accumulates dgamma/dbeta in a buffer of the input's dtype: for
    bf16 at 2048 x 1024 that is off by ~25% of the gradient; this costs one more pass over x and dy.
    """
    t, n = x2d.shape
    rows = max(1, min(t, _CHUNK_ELEMENTS // n))
    if rows == t:  # one chunk: convert and go
        _, dg, db = _aten.native_layer_norm_backward(dy.to(gamma.dtype), x2d.to(gamma.dtype), [n], mean2d, rstd2d,
                                                     gamma, gamma, [False, *want])
        return dg, db
    x_buf = torch.empty(rows, n, dtype=gamma.dtype, device=x2d.device)
    dy_buf = torch.empty_like(x_buf)
    dgamma = torch.zeros(n, dtype=gamma.dtype, device=x2d.device) if want[0] else None
    dbeta = torch.zeros(n, dtype=gamma.dtype, device=x2d.device) if want[1] else None
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        xc, dyc = x_buf[: stop - start], dy_buf[: stop - start]
        xc.copy_(x2d[start:stop])
        dyc.copy_(dy[start:stop])
        _, dg, db = _aten.native_layer_norm_backward(dyc, xc, [n], mean2d[start:stop], rstd2d[start:stop], gamma,
                                                     gamma, [False, *want])
        if dgamma is not None:
            dgamma.add_(dg)
        if dbeta is not None:
            dbeta.add_(db)
    return dgamma, dbeta


def layer_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, mean [T], rstd [T])`` (stats dtype)."""
    where = "layer_norm_fwd"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    check_vector(bias, "bias", n, x2d.device, where)
    if _native_layer_norm(x2d):
        gamma = _gamma(weight, zero_centered_gamma, output_scale, n, x2d)
        beta = None if bias is None else bias if bias.dtype == gamma.dtype else bias.to(gamma.dtype)
        if beta is not None and output_scale != 1.0:
            beta = beta * output_scale
        y, mean, rstd = torch.native_layer_norm(x2d, (n,), gamma, beta, eps)
        return y, mean.view(-1), rstd.view(-1)
    stats = norm_partial_stats(x2d, rms=False)
    mean = stats[:, 0].contiguous()
    rstd = stats[:, 1].div(n).add_(eps).rsqrt_()
    return norm_fwd_with_stats(x2d, mean, rstd, weight, bias, zero_centered_gamma=zero_centered_gamma,
                               output_scale=output_scale), mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None, db [N] | None)``, dw/db in the stats dtype."""
    where = "layer_norm_bwd"
    _, n = _check_x(x2d, where)
    _check_dy(dy, x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    _check_stats(mean, "mean", x2d, where)
    _check_stats(rstd, "rstd", x2d, where)
    if _native_layer_norm(x2d):
        gamma = _gamma(weight, zero_centered_gamma, output_scale, n, x2d)
        mean2d, rstd2d = mean.view(-1, 1), rstd.view(-1, 1)
        want = [weight is not None, has_bias]
        dy_x = dy if dy.dtype == x2d.dtype else dy.to(x2d.dtype)
        if x2d.dtype == gamma.dtype:  # float32 / float64: the native kernel accumulates dgamma in that dtype
            # the native backward reads beta only for its dtype and device; dbeta = Σ dy needs neither value
            dx, dgamma, dbeta = _aten.native_layer_norm_backward(
                dy_x, x2d, [n], mean2d, rstd2d, gamma, gamma, [True, *want])
        else:  # 16-bit: its dgamma/dbeta buffers are 16-bit (layer_norm_kernel.cpp), so take only dx from it
            dx = _aten.native_layer_norm_backward(dy_x, x2d, [n], mean2d, rstd2d, gamma, None, [True, False, False])[0]
            dgamma, dbeta = _native_param_grads(dy_x, x2d, mean2d, rstd2d, gamma, want) if any(want) else (None, None)
        dw = None if dgamma is None else dgamma.mul_(output_scale) if output_scale != 1.0 else dgamma
        db = None if dbeta is None else dbeta.mul_(output_scale) if output_scale != 1.0 else dbeta
        return dx if dx.dtype == dy.dtype else dx.to(dy.dtype), dw, db
    dx, _, dw, db = _bwd_core(dy, x2d, weight, mean, rstd, zero_centered_gamma, output_scale, sums=None, n_total=n,
                              want_dx=True, want_dw=weight is not None, want_db=has_bias)
    return dx, dw, db  # type: ignore[return-value]


def rms_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, rstd [T])`` (stats dtype)."""
    where = "rms_norm_fwd"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    ct = stats_dtype(x2d.dtype)
    xf = x2d.to(ct, copy=True)
    rstd = _rms_rstd(xf, n, eps)
    xf.mul_(rstd.unsqueeze(-1))
    return _finish_y(xf, _gain(weight, zero_centered_gamma, output_scale, ct), None, 1.0, x2d.dtype), rstd


def rms_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None)``, dw in the stats dtype."""
    where = "rms_norm_bwd"
    _, n = _check_x(x2d, where)
    _check_dy(dy, x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    _check_stats(rstd, "rstd", x2d, where)
    dx, _, dw, _ = _bwd_core(dy, x2d, weight, None, rstd, zero_centered_gamma, output_scale, sums=None, n_total=n,
                             want_dx=True, want_dw=weight is not None, want_db=False)
    return dx, dw  # type: ignore[return-value]


def add_rms_norm_fwd(
    x2d: torch.Tensor, residual2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``(y x.dtype, residual_out residual.dtype, rstd [T])``.

    ``residual_out = x + residual`` (torch adds 16-bit tensors in float32 and rounds once),
    ``y = rms_norm(residual_out)``: the norm sees exactly the residual the next block adds to.
    """
    where = "add_rms_norm_fwd"
    _check_x(x2d, where)
    if residual2d is None:
        fail(ValueError, where, "residual2d", None, "a [T, N] tensor")
    check_2d(residual2d, "residual2d", where, like=x2d, same_dtype=False, dtypes=_DTYPES)
    residual_out = torch.add(x2d, residual2d).to(residual2d.dtype)
    y, rstd = rms_norm_fwd(residual_out, weight, eps, zero_centered_gamma=zero_centered_gamma,
                           output_scale=output_scale)
    return y.to(x2d.dtype), residual_out, rstd


def add_rms_norm_bwd(
    dy: torch.Tensor, dresidual_out: torch.Tensor | None, residual_out: torch.Tensor, weight: torch.Tensor | None,
    rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`add_rms_norm_fwd`: ``(dx (= dresidual) [T, N] dy.dtype, dw | None)``."""
    if dresidual_out is not None:
        check_2d(dresidual_out, "dresidual_out", "add_rms_norm_bwd", like=dy, same_dtype=False, dtypes=_DTYPES)
    dx, dw = rms_norm_bwd(dy.to(residual_out.dtype), residual_out, weight, rstd,
                          zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
    if dresidual_out is not None:
        dx = torch.add(dx, dresidual_out)
    return dx.to(dy.dtype), dw


# ----------------------------------------------------------------------------------------------
# hidden-sharded pieces (see distnorm.kernels.sharded for the protocol)


def norm_partial_stats(x2d: torch.Tensor, *, rms: bool) -> torch.Tensor:
    """Per-token statistics of this rank's columns, before the cross-shard exchange (stats dtype).

    ``x2d [T, H_local] -> [T, 1]`` (``Σx²``) for RMSNorm, ``[T, 2]`` (local mean, local
    ``M2 = Σ(x - mean)²``) for LayerNorm: two passes with a compensated mean, so the mean is the
    correctly rounded one even at |mean|/std ≥ 1e3, where a plain float32 mean is off by up to an
    ulp of |mean| — which ``x_hat`` would see as ulp(|mean|)/std.
    """
    _, n = _check_x(x2d, "norm_partial_stats")
    ct = stats_dtype(x2d.dtype)
    if rms:
        return _sumsq(x2d.to(ct)).unsqueeze(-1)
    xf = x2d.to(ct, copy=True)
    mean_hi = xf.mean(dim=-1, keepdim=True)
    # second pass around mean_hi: x - mean_hi is exact where it matters (|mean| >> std, Sterbenz), so
    # the residual mean c corrects mean_hi to the correctly rounded mean and M2 loses nothing
    d = xf.sub_(mean_hi)
    c = d.mean(dim=-1, keepdim=True)
    m2 = _sumsq(d).unsqueeze(-1).sub_(c.square() * n)
    return torch.cat([mean_hi.add_(c), m2.clamp_min_(0.0)], dim=-1)


def norm_fwd_with_stats(
    x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> torch.Tensor:
    """Normalise with given statistics (``mean`` None = RMSNorm): ``y [T, H_local]`` in x's dtype."""
    where = "norm_fwd_with_stats"
    _, n = _check_x(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    check_vector(bias, "bias", n, x2d.device, where)
    _check_stats(rstd, "rstd", x2d, where)
    if mean is not None:
        _check_stats(mean, "mean", x2d, where)
    gain = _gain(weight, zero_centered_gamma, output_scale, rstd.dtype)
    return _finish_y(_work(x2d, mean, rstd), gain, bias, output_scale, x2d.dtype)


def norm_bwd_partial(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
    rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0, has_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(sums [T, 2] (Σg, Σg·x̂) | [T, 1] (Σg·x̂), dw | None, db | None)`` of this shard, stats dtype."""
    where = "norm_bwd_partial"
    _, n = _check_x(x2d, where)
    _check_dy(dy, x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    _check_stats(rstd, "rstd", x2d, where)
    if mean is not None:
        _check_stats(mean, "mean", x2d, where)
    _, sums, dw, db = _bwd_core(dy, x2d, weight, mean, rstd, zero_centered_gamma, output_scale, sums=None,
                                n_total=n, want_dx=False, want_dw=weight is not None,
                                want_db=has_bias and mean is not None)
    return sums, dw, db


def norm_bwd_finish(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
    sums: torch.Tensor, n_total: int, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
) -> torch.Tensor:
    """``dx [T, H_local]`` in dy's dtype from the all-reduced ``sums`` over ``n_total`` columns."""
    where = "norm_bwd_finish"
    _, n = _check_x(x2d, where)
    _check_dy(dy, x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    if not isinstance(n_total, int) or isinstance(n_total, bool) or n_total < n:
        fail(ValueError, where, "n_total", n_total, f"an int >= x2d.shape[1] = {n} (the full hidden size)")
    _check_stats(sums, "sums", x2d, where, width=1 if mean is None else 2)
    _check_stats(rstd, "rstd", x2d, where)
    if mean is not None:
        _check_stats(mean, "mean", x2d, where)
    dx, _, _, _ = _bwd_core(dy, x2d, weight, mean, rstd, zero_centered_gamma, output_scale, sums=sums,
                            n_total=n_total, want_dx=True, want_dw=False, want_db=False)
    return dx  # type: ignore[return-value]
