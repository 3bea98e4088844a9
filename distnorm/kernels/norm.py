"""Triton LayerNorm / RMSNorm / fused residual-add + RMSNorm, forward and backward.

One forward and one backward kernel serve every local norm in distnorm; ``constexpr`` flags set
by the launchers pick the variant (``IS_RMS_NORM``, ``HAS_RESIDUAL``, ``HAS_WEIGHT``,
``HAS_BIAS``, ``ZERO_CENTERED_GAMMA``) and the sharded-statistics roles that
:mod:`distnorm.kernels.sharded` launches (``STATS_GIVEN``: normalise with statistics reduced
elsewhere; ``STORE_SUMS`` / ``SUMS_GIVEN``: emit or consume the per-token backward row sums).

Math (per token row ``x`` of ``N`` elements, ``w = weight (+1 if zero-centred)``, ``s = output_scale``)::

    LayerNorm  x_hat = (x - mean) * rstd,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)
    RMSNorm    x_hat = x * rstd,           rstd = 1 / sqrt(mean(x^2) + eps)
    y  = (x_hat * w + b) * s
    g  = dy * s * w
    dx = rstd * (g - x_hat * sum(g * x_hat) / N [- sum(g) / N])     (LayerNorm adds the bracket)
    dw = sum_rows(dy * s * x_hat),  db = sum_rows(dy * s)

Design and limits:
- A program owns a ``BLOCK_M x BLOCK_N`` tile, ``BLOCK_N = next_pow2(N)``: a whole row sits in
  registers, so x is read once in the forward and x, dy once in the backward (the minimum bytes).
  Rows up to 64 KiB (``N <= 32768`` in 16-bit dtypes, ``16384`` in float32) are supported;
  register pressure makes the kernels fastest up to ``N = 8192``. Small ``N`` packs several rows
  per program (``BLOCK_M > 1``).
- Loads upcast to float32; ``mean``/``rstd`` are float32; outputs are stored in the output's dtype.
  The residual sum is rounded to ``residual_out``'s dtype *before* the statistics, so
  ``y == rms_norm(residual_out)`` exactly as the backward (which re-reads ``residual_out``) sees it.
- dW/dB: the backward grid is a fixed number of programs (2 per SM on CUDA); each loops over a
  contiguous range of rows and writes one partial row (float64 for float32 inputs, else float32); the
  launcher sums the partial rows with one ``torch.sum`` and returns float32 dW/dB, which the autograd
  Functions reduce over ranks before the one cast to the parameter dtype. No atomics: results are
  bitwise reproducible run to run.
- Per-row scalars use IEEE ``sqrt_rn`` / ``div_rn`` (they cost nothing in a memory-bound kernel).

Launchers take 2-D ``[T, N]`` tensors with unit stride along ``N`` (any row stride) and validate
shapes, strides and dtypes; :mod:`distnorm.kernels` dispatches to them and to the torch fallbacks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import cast

import torch
import triton
import triton.language as tl

from distnorm.kernels._checks import check_2d, check_stats, check_vector, fail

__all__ = [
    "MAX_ROW_BYTES",
    "add_rms_norm_bwd",
    "add_rms_norm_fwd",
    "is_interpreted",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "norm_bwd",
    "norm_fwd",
    "rms_norm_bwd",
    "rms_norm_fwd",
]

MAX_ROW_BYTES = 65536  # a whole row in registers; see the module docstring


@triton.jit
def _norm_fwd_kernel(
    X, RESIDUAL, RESIDUAL_OUT, W, B, Y, MEAN, RSTD,
    stride_x_row, stride_res_row, stride_res_out_row, stride_y_row,
    M, N, eps, output_scale,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ZERO_CENTERED_GAMMA: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[M, N] = norm(x (+ residual)); stores mean[M] (LayerNorm) and rstd[M] unless STATS_GIVEN."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(RESIDUAL + rows64 * stride_res_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        res_out = (x + res).to(RESIDUAL_OUT.dtype.element_ty)
        tl.store(RESIDUAL_OUT + rows64 * stride_res_out_row + cols[None, :], res_out, mask=mask)
        x = res_out.to(tl.float32)
    if STATS_GIVEN:
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if not IS_RMS_NORM:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    else:
        if IS_RMS_NORM:
            var = tl.sum(x * x, axis=1) / N
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / N
            tl.store(MEAN + rows, mean, mask=row_mask)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        tl.store(RSTD + rows, rstd, mask=row_mask)
    if IS_RMS_NORM:
        y = x * rstd[:, None]
    else:
        y = (x - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED_GAMMA:
            w += 1.0
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y = y * output_scale
    tl.store(Y + rows64 * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DX, DRESIDUAL, DW_PARTIAL, DB_PARTIAL, MEAN, RSTD, SUMS,
    stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row,
    M, N, n_total, output_scale, rows_per_program,
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ZERO_CENTERED_GAMMA: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_SUMS: tl.constexpr,
    SUMS_GIVEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx[M, N] (+ dresidual) and one float32 partial row of dW / dB per program.

    dW / dB accumulate in ``ACC_DTYPE``: float64 for float32 inputs (a float32 weight gradient
    summed over many tokens is where float32 rounding shows), float32 for 16-bit inputs (whose
    gradients round to 16 bits anyway). Rows ``[pid * rows_per_program, (pid + 1) * rows_per_program)`` belong to program ``pid``.
    ``SUMS`` is ``[M, 2]`` (LayerNorm: Σg, Σg·x_hat) or ``[M, 1]`` (RMSNorm: Σg·x_hat), float32:
    written when STORE_SUMS (over this row's N columns), read when SUMS_GIVEN (reduced over a
    hidden dim of ``n_total`` elements elsewhere); otherwise the sums are taken here over N.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED_GAMMA:
            w += 1.0
    if COMPUTE_DW:
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if COMPUTE_DB:
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_start = pid * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):
        rows = row_start + offset + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS_NORM:
            x_hat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = dy * output_scale
        if COMPUTE_DW:
            dw_acc += (dy * x_hat).to(ACC_DTYPE)
        if COMPUTE_DB:
            db_acc += dy.to(ACC_DTYPE)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        if SUMS_GIVEN:
            if IS_RMS_NORM:
                c_gx = tl.load(SUMS + rows, mask=row_mask, other=0.0) / n_total
            else:
                c_g = tl.load(SUMS + rows * 2, mask=row_mask, other=0.0) / n_total
                c_gx = tl.load(SUMS + rows * 2 + 1, mask=row_mask, other=0.0) / n_total
        else:
            sum_gx = tl.sum(g * x_hat, axis=1)
            c_gx = sum_gx / N
            if not IS_RMS_NORM:
                sum_g = tl.sum(g, axis=1)
                c_g = sum_g / N
            if STORE_SUMS:
                if IS_RMS_NORM:
                    tl.store(SUMS + rows, sum_gx, mask=row_mask)
                else:
                    tl.store(SUMS + rows * 2, sum_g, mask=row_mask)
                    tl.store(SUMS + rows * 2 + 1, sum_gx, mask=row_mask)
        if STORE_DX:
            if IS_RMS_NORM:
                dx = (g - x_hat * c_gx[:, None]) * rstd[:, None]
            else:
                dx = (g - c_g[:, None] - x_hat * c_gx[:, None]) * rstd[:, None]
            if HAS_DRESIDUAL:
                dres = tl.load(DRESIDUAL + rows64 * stride_dres_row + cols[None, :], mask=mask, other=0.0)
                dx += dres.to(tl.float32)
            tl.store(DX + rows64 * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# launchers


def is_interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_norm_fwd_kernel, InterpretedFunction)


_INTERPRETER_LOCK = threading.Lock()


def launch_guard() -> contextlib.AbstractContextManager:
    """Serialise launches under the interpreter, which patches ``triton.language`` process-wide while a
    kernel runs (so two rank threads of ``distnorm.testing.simulate`` would trip over each other).
    Compiled kernels launch without a lock."""
    return _INTERPRETER_LOCK if is_interpreted() else contextlib.nullcontext()


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(x: torch.Tensor, where: str) -> None:
    if x.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            f"{where}: the Triton kernels got a CPU tensor but were compiled for the GPU (rank {_rank()}); "
            "use backend='torch', or set TRITON_INTERPRET=1 before distnorm.kernels.norm is imported"
        )


def _rank() -> int:
    from distnorm.comm import _global_rank

    return _global_rank()


def _tile(n: int, dtype: torch.dtype, where: str, *, bwd: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` elements of ``dtype``.

    The forward holds ~16 fp32 values of a tile per thread (512 elements per warp); the backward
    keeps x, dy, w and the dW/dB accumulators live, so it gets twice the warps (8 values per
    thread) to stay under the register budget that lets 16+ warps share an SM (see
    ``benchmarks/kernel_resources.py`` for the per-variant register counts).
    """
    block_n = triton.next_power_of_2(n)
    elem = torch.finfo(dtype).bits // 8
    if n * elem > MAX_ROW_BYTES:
        fail(ValueError, where, "x2d.shape[1]", n, f"a row of at most {MAX_ROW_BYTES} bytes ({MAX_ROW_BYTES // elem} elements of {dtype})")
    block_m = max(1, min(128, 2048 // block_n))
    num_warps = min(max(block_m * block_n // (256 if bwd else 512), 1), 32)
    return block_m, block_n, num_warps


def _bwd_programs(m: int, block_m: int, device: torch.device) -> int:
    """Number of backward programs: fixed per (shape, device), so dW/dB are reproducible."""
    blocks = triton.cdiv(m, block_m)
    if device.type == "cuda":
        return max(1, min(blocks, 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())))
    return max(1, min(blocks, 4))  # interpreter: programs run one after the other


def norm_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    residual: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    where: str = "norm_fwd",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The one forward launcher: ``(y, mean | None, rstd, residual_out | None)``.

    ``x2d [T, N]``; ``residual [T, N]`` adds first (``residual_out`` in residual's dtype);
    ``rstd`` (and ``mean`` for LayerNorm) given = normalise with them (``STATS_GIVEN``), else they
    are computed and returned, float32 ``[T]``. ``y`` in x's dtype.
    """
    t, n = check_2d(x2d, "x2d", where)
    _check_device(x2d, where)
    check_vector(weight, "weight", n, x2d.device, where)
    check_vector(bias, "bias", n, x2d.device, where)
    if residual is not None:
        check_2d(residual, "residual2d", where, like=x2d, same_dtype=False)
    stats_given = rstd is not None
    if rstd is not None:
        check_stats(rstd, "rstd", t, x2d.device, where)
        if not rms:
            check_stats(mean, "mean", t, x2d.device, where)
    block_m, block_n, num_warps = _tile(n, x2d.dtype, where)
    y = torch.empty((t, n), dtype=x2d.dtype, device=x2d.device)
    residual_out = None if residual is None else torch.empty((t, n), dtype=residual.dtype, device=x2d.device)
    if rstd is None:
        rstd = torch.empty((t,), dtype=torch.float32, device=x2d.device)
        mean = None if rms else torch.empty((t,), dtype=torch.float32, device=x2d.device)
    if t > 0:
        with launch_guard():
            _norm_fwd_kernel[(triton.cdiv(t, block_m),)](
                x2d, residual, residual_out, weight, bias, y, mean, rstd,
                x2d.stride(0),
                residual.stride(0) if residual is not None else 0,
                residual_out.stride(0) if residual_out is not None else 0,
                y.stride(0),
                t, n, float(eps), float(output_scale),
                IS_RMS_NORM=rms,
                HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                ZERO_CENTERED_GAMMA=zero_centered_gamma,
                STATS_GIVEN=stats_given,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=num_warps,
            )
    return y, mean, rstd, residual_out


def norm_bwd(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    compute_dw: bool,
    compute_db: bool,
    store_dx: bool = True,
    store_sums: bool = False,
    sums: torch.Tensor | None = None,
    n_total: int | None = None,
    dresidual: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    where: str = "norm_bwd",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one backward launcher: ``(dx | None, dw | None, db | None, sums | None)``.

    ``mean is None`` = RMSNorm. ``dx`` in dy's dtype; ``dw`` / ``db`` float32 whatever the weight's
    dtype (the caller sums them over ranks first and casts once: docs/precision.md), reduced from
    the per-program partial rows by one ``torch.sum``.
    ``store_sums`` returns the per-row float32 ``[T, 2 | 1]`` backward sums instead of using them;
    ``sums`` given (with ``n_total``) uses those for ``dx``.
    """
    t, n = check_2d(x2d, "x2d", where)
    _check_device(x2d, where)
    check_2d(dy, "dy", where, like=x2d, same_dtype=False)
    check_vector(weight, "weight", n, x2d.device, where)
    rms = mean is None
    check_stats(rstd, "rstd", t, x2d.device, where)
    if not rms:
        check_stats(mean, "mean", t, x2d.device, where)
    if dresidual is not None:
        check_2d(dresidual, "dresidual_out", where, like=x2d, same_dtype=False)
    n_sums = 1 if rms else 2
    if sums is not None:
        check_stats(sums, "sums", t, x2d.device, where, width=n_sums)
    block_m, block_n, num_warps = _tile(n, x2d.dtype, where, bwd=True)
    programs = _bwd_programs(t, block_m, x2d.device)
    rows_per_program = triton.cdiv(triton.cdiv(t, programs), block_m) * block_m
    device = x2d.device
    dx = torch.empty((t, n), dtype=dy.dtype, device=device) if store_dx else None
    acc_dtype = torch.float64 if x2d.dtype == torch.float32 else torch.float32
    dw_partial = torch.empty((programs, n), dtype=acc_dtype, device=device) if compute_dw else None
    db_partial = torch.empty((programs, n), dtype=acc_dtype, device=device) if compute_db else None
    sums_out = torch.empty((t, n_sums), dtype=torch.float32, device=device) if store_sums else None
    if t > 0:
        with launch_guard():
            _norm_bwd_kernel[(programs,)](
                x2d, weight, dy, dx, dresidual, dw_partial, db_partial, mean, rstd,
                sums if sums is not None else sums_out,
                x2d.stride(0), dy.stride(0),
                dx.stride(0) if dx is not None else 0,
                dresidual.stride(0) if dresidual is not None else 0,
                t, n, float(n_total if n_total is not None else n), float(output_scale), rows_per_program,
                IS_RMS_NORM=rms,
                HAS_WEIGHT=weight is not None,
                ZERO_CENTERED_GAMMA=zero_centered_gamma,
                HAS_DRESIDUAL=dresidual is not None,
                COMPUTE_DW=compute_dw,
                COMPUTE_DB=compute_db,
                STORE_DX=store_dx,
                STORE_SUMS=store_sums,
                SUMS_GIVEN=sums is not None,
                ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=num_warps,
            )
    grad_dtype = torch.float32  # never the weight's dtype: a bf16 partial would be rounded before the all-reduce
    dw = None
    db = None
    if dw_partial is not None:
        dw = (dw_partial.sum(0) if t > 0 else dw_partial.new_zeros(n)).to(grad_dtype)
    if db_partial is not None:
        db = (db_partial.sum(0) if t > 0 else db_partial.new_zeros(n)).to(grad_dtype)
    return dx, dw, db, sums_out


# ----------------------------------------------------------------------------------------------
# the contract (same signatures as distnorm.kernels.torch_ops)


def layer_norm_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, mean [T] fp32, rstd [T] fp32)``."""
    y, mean, rstd, _ = norm_fwd(x2d, weight, bias, eps, rms=False, zero_centered_gamma=zero_centered_gamma,
                                output_scale=output_scale, where="layer_norm_fwd")
    return y, cast(torch.Tensor, mean), rstd


def layer_norm_bwd(
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
    """LayerNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None, db [N] | None)`` (dw/db float32)."""
    if mean is None:
        fail(ValueError, "layer_norm_bwd", "mean", None, "the float32 [T] mean saved by layer_norm_fwd")
    dx, dw, db, _ = norm_bwd(dy, x2d, weight, mean, rstd, compute_dw=weight is not None, compute_db=has_bias,
                             zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                             where="layer_norm_bwd")
    return cast(torch.Tensor, dx), dw, db


def rms_norm_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, rstd [T] fp32)``."""
    y, _, rstd, _ = norm_fwd(x2d, weight, None, eps, rms=True, zero_centered_gamma=zero_centered_gamma,
                             output_scale=output_scale, where="rms_norm_fwd")
    return y, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward: ``(dx [T, N] dy.dtype, dw [N] float32 | None)``."""
    dx, dw, _, _ = norm_bwd(dy, x2d, weight, None, rstd, compute_dw=weight is not None, compute_db=False,
                            zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                            where="rms_norm_bwd")
    return cast(torch.Tensor, dx), dw


def add_rms_norm_fwd(
    x2d: torch.Tensor,
    residual2d: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: ``(y x.dtype, residual_out residual.dtype, rstd [T] fp32)``.

    ``residual_out = x + residual`` (summed in float32, rounded to residual's dtype) and
    ``y = rms_norm(residual_out)``. Reads x, residual, w; writes y, residual_out.
    """
    if residual2d is None:
        fail(ValueError, "add_rms_norm_fwd", "residual2d", None, "a [T, N] tensor")
    y, _, rstd, residual_out = norm_fwd(x2d, weight, None, eps, rms=True, residual=residual2d,
                                        zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                                        where="add_rms_norm_fwd")
    return y, cast(torch.Tensor, residual_out), rstd


def add_rms_norm_bwd(
    dy: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    residual_out: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`add_rms_norm_fwd`: ``(dx (= dresidual) [T, N] dy.dtype, dw | None)``.

    ``dx = rms_norm_bwd(dy) + dresidual_out`` in one pass (reads residual_out, dy, dresidual_out, w).
    """
    dx, dw, _, _ = norm_bwd(dy, residual_out, weight, None, rstd, compute_dw=weight is not None,
                            compute_db=False, dresidual=dresidual_out, zero_centered_gamma=zero_centered_gamma,
                            output_scale=output_scale, where="add_rms_norm_bwd")
    return cast(torch.Tensor, dx), dw
