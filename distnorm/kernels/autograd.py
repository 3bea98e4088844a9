"""Autograd Functions of LayerNorm / RMSNorm / add+RMSNorm in all three forms, and their functional entry points.

| form | activations | parameters | Function | entry point |
|---|---|---|---|---|
| local | ``[*, N]`` | ``[N]`` | :class:`LayerNormFn`, :class:`RMSNormFn`, :class:`AddRMSNormFn` | :func:`layer_norm`, :func:`rms_norm`, :func:`add_rms_norm` |
| sequence parallel | this rank's tokens ``[*, N]`` | replicated ``[N]`` | the local Functions with ``grad_group`` | :func:`sequence_parallel_norm` |
| hidden-sharded | ``[*, N_local]`` | sharded ``[N_local]`` | :class:`ShardedNormFn` | :func:`sharded_norm` |
| CRMSNorm, both forms | ``[*, d-1]`` or its shard | replicated or sharded | :class:`CRMSNormFn` | ``CRMSNorm`` |

Every Function saves only ``x`` (``residual_out`` for add+RMSNorm, which is also its output), the
parameters and the per-row statistics, and calls the launchers of :mod:`distnorm.kernels` with the
backend resolved once in the forward (torch's native kernels or the composites of ``torch_ops`` on
the CPU, the Triton kernels on CUDA). The precision contract (``docs/precision.md``): statistics in
float32 (float64 for float64 inputs); the launchers return dW/dB in float32; the Function sums them
over ``grad_group`` (one all-reduce of the flat ``[dw, db]``) and only then casts each to its
parameter's dtype; outputs in the input's dtype.

A weight may be ``[N]`` or ``[1]`` (one gain shared by every column, ``SingleScaleRMSNorm``): the
``[1]`` gain's gradient is summed over the columns in float32 before any rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distnorm import comm
from distnorm import kernels as K
from distnorm.comm import Group, group_size
from distnorm.kernels._checks import GRAD_SYNC_MODES, check_norm_inputs, local_shard_size, where_in

__all__ = [
    "AddRMSNormFn",
    "CRMSNormFn",
    "LayerNormFn",
    "RMSNormFn",
    "ShardedNormFn",
    "add_rms_norm",
    "layer_norm",
    "rms_norm",
    "sequence_parallel_norm",
    "sharded_norm",
]


def as_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [*, n]`` as ``[T, n]`` with unit stride along ``n`` (a view unless that stride is not 1)."""
    t2d = t if t.dim() == 2 else t.reshape(-1, n)
    return t2d if t2d.stride(-1) == 1 or n == 1 else t2d.contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` viewed in ``ref``'s shape (no call when it already has it: this is the per-call hot path)."""
    return t if t.shape == ref.shape else t.view(ref.shape)


def _gain_operand(weight: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The ``[n]`` weight the launchers take: the weight itself, or a ``[1]`` gain expanded (n numbers)."""
    if weight is None or weight.dim() != 1 or weight.shape[0] != 1 or n == 1:
        return weight  # anything but a [1] gain goes to the launchers' shape check as it is
    return weight.expand(n).contiguous()


def _param_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor | None], group: Group,
                 extra: torch.Tensor | None = None) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Finish parameter gradients: fold to each parameter's shape, sum over ``group``, cast once.

    ``grads`` are float32 (float64 for float64 inputs) ``[N]`` gradients of ``params`` (a ``[1]``
    gain's is summed over its columns here). With ``group`` of size > 1 they travel in one
    all-reduce, together with ``extra`` (a per-token payload the caller needs reduced over the same
    group, returned reduced). Each gradient is cast to its parameter's dtype after the sum.
    """
    folded = [None if g is None or p is None else (g.sum(0, keepdim=True) if p.numel() == 1 < g.numel() else g)
              for g, p in zip(grads, params)]
    present = [g for g in folded if g is not None]
    if group_size(group) > 1 and (present or extra is not None):
        parts = ([] if extra is None else [extra.reshape(-1)]) + [g.reshape(-1) for g in present]
        flat = comm.all_reduce_(torch.cat(parts) if len(parts) > 1 else parts[0], group)
        offset = 0
        if extra is not None:
            extra = flat[: extra.numel()].view(extra.shape)
            offset = extra.numel()
        for i, g in enumerate(folded):
            if g is not None:
                folded[i] = flat[offset: offset + g.numel()]
                offset += g.numel()
    out = [None if g is None or p is None else
           g if g.dtype == p.dtype and g.shape == p.shape else g.reshape(p.shape).to(p.dtype)
           for g, p in zip(folded, params)]
    return out, extra


# ----------------------------------------------------------------------------------------------
# whole rows: local and sequence parallel


class LayerNormFn(torch.autograd.Function):
    """``y = ((x - mean) * rstd * w_eff + b) * output_scale`` over the last dim of ``x [*, N]``.

    ``apply(x, weight, bias, eps, zero_centered_gamma, output_scale, backend="auto", grad_group=None)``;
    ``grad_group`` (sequence parallel: tokens split over it, parameters replicated) makes the
    backward all-reduce the flat float32 ``[dw, db]`` once before casting.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, eps, zero_centered_gamma, output_scale, backend="auto", grad_group=None):
        n = x.shape[-1]
        x2d = as_2d(x, n)
        backend = K.resolve_backend(x2d, backend, where="layer_norm")
        y, mean, rstd = K.launcher("layer_norm_fwd", backend)(
            x2d, _gain_operand(weight, n), bias, eps, zero_centered_gamma=zero_centered_gamma,
            output_scale=output_scale)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend, grad_group)
        return _like(y, x)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend, grad_group = ctx.config
        n = x2d.shape[-1]
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        dx, dw, db = K.launcher("layer_norm_bwd", backend)(
            as_2d(dy, n), x2d, _gain_operand(weight, n), mean, rstd, zero_centered_gamma=zero_centered_gamma,
            output_scale=output_scale, has_bias=want_b)
        (dw, db), _ = _param_grads([dw if want_w else None, db], [weight, bias], grad_group)
        return _like(dx, dy), dw, db, None, None, None, None, None


class RMSNormFn(torch.autograd.Function):
    """``y = x * rstd * w_eff * output_scale`` over the last dim of ``x [*, N]``.

    ``apply(x, weight, eps, zero_centered_gamma, output_scale, backend="auto", grad_group=None)``;
    ``grad_group`` as in :class:`LayerNormFn`.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, eps, zero_centered_gamma, output_scale, backend="auto", grad_group=None):
        n = x.shape[-1]
        x2d = as_2d(x, n)
        backend = K.resolve_backend(x2d, backend, where="rms_norm")
        y, rstd = K.launcher("rms_norm_fwd", backend)(
            x2d, _gain_operand(weight, n), eps, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend, grad_group)
        return _like(y, x)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend, grad_group = ctx.config
        n = x2d.shape[-1]
        want_w = weight is not None and ctx.needs_input_grad[1]
        dx, dw = K.launcher("rms_norm_bwd", backend)(
            as_2d(dy, n), x2d, _gain_operand(weight, n) if weight is not None else None, rstd,
            zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
        (dw,), _ = _param_grads([dw if want_w else None], [weight], grad_group)
        return _like(dx, dy), dw, None, None, None, None, None


class AddRMSNormFn(torch.autograd.Function):
    """``residual_out = x + residual``, ``y = rms_norm(residual_out)``; returns ``(y, residual_out)``.

    Saves ``residual_out`` (not x and residual): the backward reads residual_out, dy and
    dresidual_out once and writes one gradient, shared by x and residual.
    """

    @staticmethod
    def forward(ctx: Any, x, residual, weight, eps, zero_centered_gamma, output_scale, backend="auto"):
        n = x.shape[-1]
        x2d = as_2d(x, n)
        backend = K.resolve_backend(x2d, backend, where="add_rms_norm")
        y, residual_out, rstd = K.launcher("add_rms_norm_fwd", backend)(
            x2d, as_2d(residual, n), _gain_operand(weight, n), eps, zero_centered_gamma=zero_centered_gamma,
            output_scale=output_scale)
        ctx.save_for_backward(residual_out, weight, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend, x.dtype, residual.dtype)
        return y.view(x.shape), residual_out.view(residual.shape)

    @staticmethod
    def backward(ctx: Any, dy, dresidual_out):
        residual_out, weight, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend, x_dtype, residual_dtype = ctx.config
        n = residual_out.shape[-1]
        dres2d = None if dresidual_out is None else as_2d(dresidual_out, n)
        dx, dw = K.launcher("add_rms_norm_bwd", backend)(
            as_2d(dy, n), dres2d, residual_out, _gain_operand(weight, n), rstd,
            zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)
        (dw,), _ = _param_grads([dw if weight is not None and ctx.needs_input_grad[2] else None], [weight], None)
        dx = dx.view(dy.shape)
        return dx.to(x_dtype), dx.to(residual_dtype), dw, None, None, None, None


# ----------------------------------------------------------------------------------------------
# hidden-sharded


class ShardedNormFn(torch.autograd.Function):
    """LayerNorm / RMSNorm over a hidden dim split across ``group`` (size > 1): one all-reduce each way.

    ``apply(x, weight, bias, eps, rms, zero_centered_gamma, output_scale, group, hidden, backend="auto",
    grad_group=None)``: ``x [*, H_local]``, ``weight``/``bias`` this rank's ``[H_local]`` columns (or
    a replicated ``[1]`` gain, whose partial gradient is summed over ``grad_group``, inside the
    backward's one all-reduce when ``grad_group`` is ``group``).

    Forward: LayerNorm exchanges ``[n_r·m_r, M2_r + n_r·m_r²]`` per token in float64, built from
    this shard's two-pass moments, so only the between-shard spread of the means cancels (in
    float64: a relative variance error of ``(mean/std)²·2⁻⁵³``); RMSNorm exchanges ``Σx²``.
    Backward: ``[Σg, Σg·x̂]`` (LayerNorm) or ``Σg·x̂`` (RMSNorm) per token; dW/dB are local.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, eps, rms, zero_centered_gamma, output_scale, group, hidden, backend="auto",
                grad_group=None):
        n_local = x.shape[-1]
        x2d = as_2d(x, n_local)
        backend = K.resolve_backend(x2d, backend, where="sharded_norm")
        stats = K.launcher("norm_partial_stats", backend)(x2d, rms=rms)
        if rms:
            comm.all_reduce_(stats, group)  # [T, 1]: Σx²
            mean = None
            rstd = stats[:, 0].div(hidden).add_(eps).rsqrt_()
        else:
            mean_local, m2_local = stats.double().unbind(-1)
            packed = torch.stack([n_local * mean_local, m2_local + n_local * mean_local.square()], dim=-1)
            comm.all_reduce_(packed, group)  # [T, 2] float64: [Σx, Σx²]
            mean64 = packed[:, 0] / hidden
            var = (packed[:, 1] / hidden - mean64.square()).clamp_min(0.0)
            mean, rstd = mean64.to(stats.dtype), torch.rsqrt(var + eps).to(stats.dtype)
        kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
        y = K.launcher("norm_fwd_with_stats", backend)(x2d, mean, rstd, _gain_operand(weight, n_local), bias, **kw)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.config = (kw, group, hidden, backend, grad_group)
        return _like(y, x)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        kw, group, hidden, backend, grad_group = ctx.config
        n_local = x2d.shape[-1]
        dy2d = as_2d(dy, n_local)
        w = _gain_operand(weight, n_local)
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        sums, dw, db = K.launcher("norm_bwd_partial", backend)(dy2d, x2d, w, mean, rstd, has_bias=want_b, **kw)
        dw = dw if want_w else None
        shared = weight is not None and weight.numel() == 1 and grad_group is group
        if shared:  # a replicated gain's partial gradient rides along with the per-token sums
            (dw, db), sums = _param_grads([dw, db], [weight, bias], group, extra=sums)
        else:
            comm.all_reduce_(sums, group)  # [T, 2] [Σg, Σg·x_hat] (LayerNorm) or [T, 1] (RMSNorm)
            (dw, db), _ = _param_grads([dw, db], [weight, bias], grad_group if weight is not None and
                                       weight.numel() == 1 else None)
        dx = K.launcher("norm_bwd_finish", backend)(dy2d, x2d, w, mean, rstd, sums, hidden, **kw)
        return dx.view(dy.shape), dw, db, None, None, None, None, None, None, None, None


class CRMSNormFn(torch.autograd.Function):
    """Compressed RMSNorm of a zero-mean d-vector stored with ``d - 1`` coordinates, sums over ``stats_group``.

    ``apply(x, weight, eps, zero_centered_gamma, output_scale, stats_group, grad_group, d, backend="auto")``:
    ``y = x · rstd · w_eff · s``, ``rstd = ((Σx² + (Σx)²)/d + eps)^-1/2``. ``stats_group`` (hidden
    split) all-reduces ``[Σx², Σx]`` per token forward and ``Σg·x̂`` backward; ``grad_group``
    (tokens split, weight replicated) all-reduces the float32 dW. Backward:
    ``dx = rstd · (g - (x_hat + S·rstd) · Σ(g·x_hat) / d)``, ``S = Σx``, ``g = dy·w_eff·s``: the
    RMSNorm finish applied to the shifted input ``x + S``.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, eps, zero_centered_gamma, output_scale, stats_group, grad_group, d,
                backend="auto"):
        n = x.shape[-1]
        x2d = as_2d(x, n)
        backend = K.resolve_backend(x2d, backend, where="crms_norm")
        moments = K.launcher("norm_partial_stats", backend)(x2d, rms=False)  # [T, 2]: local mean, local M2
        mean = moments[:, 0]
        stats = torch.stack([moments[:, 1] + n * mean.square(), n * mean], dim=-1)  # [T, 2]: Σx², Σx
        comm.all_reduce_(stats, stats_group)
        total = stats[:, 1].contiguous()  # saved: its own [T], not a view that keeps [T, 2] alive
        rstd = ((stats[:, 0] + total.square()) / d + eps).rsqrt()
        kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
        y = K.launcher("norm_fwd_with_stats", backend)(x2d, None, rstd, weight, None, **kw)
        ctx.save_for_backward(x2d, weight, rstd, total)
        ctx.config = (kw, stats_group, grad_group, d, backend)
        return _like(y, x)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, rstd, total = ctx.saved_tensors
        kw, stats_group, grad_group, d, backend = ctx.config
        dy2d = as_2d(dy, x2d.shape[-1])
        sums, dw, _ = K.launcher("norm_bwd_partial", backend)(dy2d, x2d, weight, None, rstd, **kw)  # Σg·x_hat
        comm.all_reduce_(sums, stats_group)
        shifted = x2d.to(rstd.dtype) + total.unsqueeze(-1)
        dx = K.launcher("norm_bwd_finish", backend)(dy2d, shifted, weight, None, rstd, sums, d, **kw)
        (dw,), _ = _param_grads([dw if ctx.needs_input_grad[1] else None], [weight], grad_group)
        return dx.to(x2d.dtype).view(dy.shape), dw, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# functional entry points


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Local LayerNorm over the last dim: ``x [*, N] -> y [*, N]`` (x.dtype), stats float32.

    Collectives: none (this is the single-device op the distributed norms build on).
    """
    return LayerNormFn.apply(x, weight, bias, eps, zero_centered_gamma, output_scale, backend)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Local RMSNorm over the last dim: ``x [*, N] -> y [*, N]`` (x.dtype). Collectives: none."""
    return RMSNormFn.apply(x, weight, eps, zero_centered_gamma, output_scale, backend)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: ``(y [*, N] x.dtype, residual_out [*, N] residual.dtype)``.

    ``residual_out = x + residual`` (float32 sum, rounded to residual's dtype);
    ``y = rms_norm(residual_out)``. Collectives: none.
    """
    return AddRMSNormFn.apply(x, residual, weight, eps, zero_centered_gamma, output_scale, backend)


def sequence_parallel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    group: Group = None,
    grad_sync: str = "backward",
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Norm of this rank's tokens with replicated parameters.

    ``x [*, H]`` (this rank's tokens) -> ``y [*, H]`` in ``x.dtype``; ``weight``/``bias [H]``.
    Collectives (P > 1): fwd none; bwd with ``grad_sync="backward"`` 1 all-reduce of the flat
    ``[dw, db]`` in the stats dtype (4 B per parameter element, 8 for float64 inputs) per call,
    not per token; none with ``"deferred"`` (see ``sync_sequence_parallel_grads``).
    ``group`` None or P == 1: none — torch's native LayerNorm kernel (or the Triton kernel on CUDA).
    """
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r} {where_in(group)}")
    grad_group = group if grad_sync == "backward" and group_size(group) > 1 else None
    if rms:
        return RMSNormFn.apply(x, weight, eps, zero_centered_gamma, output_scale, backend, grad_group)
    return LayerNormFn.apply(x, weight, bias, eps, zero_centered_gamma, output_scale, backend, grad_group)


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
    backend: str = "auto",
    fn: str = "sharded_norm",
) -> torch.Tensor:
    """Norm over a hidden dim split across ``group``.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(hidden, P)[rank]``;
    ``weight``/``bias [H_local]`` exactly (anything else, a broadcastable ``[1]`` included, is a
    ValueError, as in ``torch.nn.functional.layer_norm``). ``hidden`` (the full size) is required
    when P > 1: it cannot be read off the local shard without a collective. Collectives (P > 1):
    fwd 1 all-reduce (LayerNorm 16 B/token; RMSNorm 4 B/token, 8 for float64 x); bwd 1 all-reduce
    (LayerNorm 8 B/token, RMSNorm 4; doubled for float64 x). ``group`` None or P == 1: none, the
    local op. ``fn``: the name errors give (the caller's).
    """
    world = group_size(group)
    if hidden is None:
        if world > 1:
            raise ValueError(
                f"{fn}: hidden (the full normalized size) is required for a group of size {world}, "
                f"got None {where_in(group)}"
            )
        hidden = x.shape[-1]
    expected = local_shard_size(hidden, group, cls=fn)
    what = (f"this rank's hidden shard shard_sizes({hidden}, {world})[{comm.group_rank(group)}]" if world > 1
            else "x's last dim")
    check_norm_inputs(fn, x, weight, bias, expected, what, group, param_shapes=True)
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale, "backend": backend}
    if world == 1:
        return sequence_parallel_norm(x, weight, bias, eps, rms=rms, **kw)  # type: ignore[arg-type]
    return ShardedNormFn.apply(x, weight, bias, eps, rms, zero_centered_gamma, output_scale, group, hidden, backend)
