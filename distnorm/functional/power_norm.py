"""PowerNorm (Shen et al., 2020, "PowerNorm: Rethinking Batch Normalization in Transformers").

Per channel, no mean subtraction: ``z = x / sqrt(psi^2 + eps)``, ``y = gamma * z + beta``, where
``psi^2`` is a *running* quadratic mean. One training step ``t`` (1-based):

* batch quadratic mean ``psi_B^2 = sum_real x^2 / n`` over the real (unmasked) elements of the
  global (data-parallel) batch;
* normaliser ``var = psi_B^2`` while ``t <= warmup_iters`` (the running value is not trustworthy
  yet; as the authors' code), else ``var = psi_{t-1}^2``;
* running update: cumulative average ``psi_t^2 = psi_{t-1}^2 + (psi_B^2 - psi_{t-1}^2) / t`` while
  ``t < warmup_iters``, the EMA ``psi_t^2 = alpha_fwd * psi_{t-1}^2 + (1 - alpha_fwd) * psi_B^2``
  from ``t = warmup_iters`` on (the authors' boundary: their step ``warmup_iters`` is an EMA step;
  before it their code applies both updates in a row, here only the cumulative average);
* approximate backward (the paper's Algorithm 1) with the running ``nu = ema_gz``:
  ``g = gamma * dy``, ``dx = (g - nu_{t-1} * z) / sqrt(var + eps)``,
  ``nu_t = nu_{t-1} * (1 - (1 - alpha_bkw) * Gamma_B) + (1 - alpha_bkw) * Lambda_B`` with
  ``Gamma_B = mean_real z^2``, ``Lambda_B = mean_real g * z`` over the global batch. (The authors'
  code stores ``ema_gz / (1 - alpha_bkw)`` and applies it scaled; the dynamics are identical.)

Optional GroupScaling1D first: per token, divide each group of ``C / group_num`` channels by its
root mean square plus ``group_scaling_eps`` (local, exact autograd). The authors fix that eps at
1e-5 whatever the norm's ``eps``; so does the default here. (Tying it to ``eps = 1e-3`` changes a
first-step output by 0.2% relative (L2) for unit-scale activations, 10% at scale 0.1, 37% at 0.03.)

Data parallel: ``[sum_real x^2 (C), n (1)]`` is all-reduced in the forward (1 all-reduce,
``C + 1`` numbers) and ``sum_real g * z`` (C) in the backward (1 all-reduce), so every rank
normalises by the same ``psi`` and applies the same correction ``nu``: N ranks equal one process
on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch

from distnorm import comm
from distnorm.comm import Group
from distnorm.functional._norm_utils import (
    channel_sum,
    commit_,
    mask_weight,
    read_state_once,
    rows_ref,
    synced_second_moment,
    unpack_state,
    vec_shape,
)
from distnorm.functional.batch_stats import stats_dtype

__all__ = ["group_scaling", "group_scaling_ref", "power_norm", "power_norm_eval", "power_norm_ref", "power_norm_step"]


def group_scaling(x: torch.Tensor, group_num: int, eps: float = 1e-5, channel_dim: int = -1) -> torch.Tensor:
    """GroupScaling1D: per token, each of ``group_num`` channel groups divided by its RMS.

    ``x [..C..] -> [..C..]`` in float32 (float64 for float64 input). Local, differentiable.
    ``eps`` is GroupScaling's own (the authors' 1e-5), not the norm's.
    """
    c_dim = channel_dim % x.dim()
    xs = x.to(stats_dtype(x.dtype)).movedim(c_dim, -1)
    shape = xs.shape
    xg = xs.reshape(*shape[:-1], group_num, shape[-1] // group_num)
    y = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    return y.reshape(shape).movedim(-1, c_dim)


def group_scaling_ref(x: torch.Tensor, group_num: int, eps: float = 1e-5, channel_dim: int = -1) -> torch.Tensor:
    """Float64 GroupScaling1D (differentiable)."""
    xc = x.double().movedim(channel_dim % x.dim(), -1)
    parts = xc.split(xc.shape[-1] // group_num, dim=-1)
    out = torch.cat([p / torch.sqrt((p * p).mean(-1, keepdim=True) + eps) for p in parts], dim=-1)
    return out.movedim(-1, channel_dim % x.dim())


class _PowerNormFn(torch.autograd.Function):
    """``x -> gamma * x * scale + beta``, ``scale`` given; the backward is the approximate gradient.

    ``ema_gz`` (and ``skips``, the non-finite guard's counter, or None) are state the backward
    updates in place: ctx attributes, not saved tensors, so two forwards may precede one backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor,
        gamma_b: torch.Tensor, n: torch.Tensor, ema_gz: torch.Tensor, skips: torch.Tensor | None,
        mask: torch.Tensor | None, c_dim: int, alpha_bkw: float, group: Group,
    ) -> torch.Tensor:
        sdt = scale.dtype
        vs = vec_shape(x, c_dim)
        z = x.to(sdt) * scale.view(vs)
        y = z if weight is None else z * weight.to(sdt).view(vs)
        if bias is not None:
            y = y + bias.to(sdt).view(vs)
        ctx.save_for_backward(z, scale, gamma_b, n, weight, mask)
        ctx.ema_gz, ctx.skips = ema_gz, skips
        ctx.c_dim, ctx.alpha_bkw, ctx.group = c_dim, alpha_bkw, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        z, scale, gamma_b, n, weight, mask = ctx.saved_tensors
        c_dim, ab = ctx.c_dim, ctx.alpha_bkw
        vs = vec_shape(z, c_dim)
        dys = dy.to(z.dtype)
        g = dys if weight is None else dys * weight.to(z.dtype).view(vs)
        lam = channel_sum(g * z, c_dim, mask_weight(z, c_dim, mask, z.dtype))
        comm.all_reduce_(lam, ctx.group)
        nu = ctx.ema_gz.to(z.dtype)
        dx = (g - nu.view(vs) * z) * scale.view(vs)
        commit_([ctx.ema_gz], [nu * (1 - (1 - ab) * gamma_b) + (1 - ab) * lam / n], ctx.skips)
        dweight = None if weight is None else channel_sum(dys * z, c_dim, None).to(weight.dtype)
        dbias = channel_sum(dys, c_dim, None).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None, None, None, None, None, None


def power_norm_step(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    ema_gz: torch.Tensor,
    *,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    group: Group = None,
    skips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PowerNorm training forward from an explicit state: ``(y, new_state)``.

    ``x [..C..]`` (GroupScaling already applied, if any). ``state`` = float64 ``[psi^2 (C), t - 1]``
    as :func:`~distnorm.functional._norm_utils.pack_state` of ``(running_phi, step)``; ``new_state``
    the same after this step (the caller commits it). ``ema_gz`` advances in the backward (guarded
    by ``skips`` when given). Collectives (P > 1): fwd 1 all-reduce of ``C + 1`` numbers (stats
    dtype); bwd 1 all-reduce of ``C``.
    """
    c_dim = channel_dim % x.dim()
    sdt = stats_dtype(x.dtype)
    c = x.shape[c_dim]
    psi_b2, n = synced_second_moment(x, c_dim, mask, group, "PowerNorm")
    with torch.no_grad():
        phi, t = state[:c], state[c] + 1
        var = torch.where(t <= warmup_iters, psi_b2, phi)
        new_phi = torch.where(t < warmup_iters, phi + (psi_b2 - phi) / t, alpha_fwd * phi + (1 - alpha_fwd) * psi_b2)
        scale = torch.rsqrt(var + eps)
    y = _PowerNormFn.apply(x, weight, bias, scale.to(sdt), (psi_b2 * scale.square()).to(sdt), n, ema_gz, skips,
                           mask, c_dim, alpha_bkw, group)
    return y, torch.cat([new_phi, t.reshape(1)])


def power_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_phi: torch.Tensor,
    ema_gz: torch.Tensor,
    step: torch.Tensor,
    *,
    training: bool,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int | None = None,
    group_scaling_eps: float = 1e-5,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> torch.Tensor:
    """PowerNorm of ``x [..C..]`` (channels on ``channel_dim``) -> ``y`` of ``x``'s shape and dtype.

    Training updates ``step`` (+1), ``running_phi`` (forward) and ``ema_gz`` (backward) in place.
    ``mask`` (bool, ``x``'s shape without the channel dim, True = real) keeps padding out of the
    statistics. Collectives in training (P > 1): fwd 1 all-reduce of ``C + 1`` numbers (stats
    dtype: fp32, fp64 for fp64 input); bwd 1 all-reduce of ``C`` numbers. Eval, ``group`` None or
    P == 1: none.
    """
    c_dim = channel_dim % x.dim()
    x_in = x if group_num is None else group_scaling(x, group_num, group_scaling_eps, c_dim)
    if not training:
        return power_norm_eval(x_in, weight, bias, running_phi, eps=eps, channel_dim=c_dim).to(x.dtype)
    y, new = power_norm_step(x_in, weight, bias, read_state_once([running_phi, step], "power_norm"), ema_gz, eps=eps, alpha_fwd=alpha_fwd,
                             alpha_bkw=alpha_bkw, warmup_iters=warmup_iters, channel_dim=c_dim, mask=mask, group=group)
    commit_([running_phi, step], unpack_state(new, [running_phi, step]), None)
    return y.to(x.dtype)


def power_norm_eval(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, second_moment: torch.Tensor, *,
    eps: float, channel_dim: int,
) -> torch.Tensor:
    """``x / sqrt(second_moment + eps) * weight + bias`` per channel, in the stats dtype. Collectives: none.

    The eval form of PowerNorm and UnifiedNorm (no mean subtraction).
    """
    c_dim = channel_dim % x.dim()
    vs = vec_shape(x, c_dim)
    sdt = stats_dtype(x.dtype)
    y = x.to(sdt) * torch.rsqrt(second_moment.to(sdt) + eps).view(vs)
    y = y if weight is None else y * weight.to(sdt).view(vs)
    return y if bias is None else y + bias.to(sdt).view(vs)


def power_norm_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int | None = None,
    group_scaling_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One PowerNorm training step on the whole batch, in float64, as a pure function.

    ``state = {"running_phi": [C], "ema_gz": [C], "step": int tensor}`` (before the step).
    Returns ``(y, dx, dweight, dbias, new_state)`` for the upstream gradient ``dy``.
    """
    c_dim = channel_dim % x.dim()
    x64 = x.double().requires_grad_(group_num is not None)
    x_in = x64 if group_num is None else group_scaling_ref(x64, group_num, group_scaling_eps, c_dim)
    w, b = weight.double(), bias.double()
    shape = [1] * x.dim()
    shape[c_dim] = -1
    psi_b2 = rows_ref(x_in.detach(), c_dim, mask).square().mean(0)
    t = int(state["step"]) + 1
    phi = state["running_phi"].double()
    var = psi_b2 if t <= warmup_iters else phi
    new_phi = phi * (t - 1) / t + psi_b2 / t if t < warmup_iters else alpha_fwd * phi + (1 - alpha_fwd) * psi_b2
    z = x_in.detach() / torch.sqrt(var + eps).view(shape)
    y = z * w.view(shape) + b.view(shape)
    dy64 = dy.double()
    g = dy64 * w.view(shape)
    zr, gr = rows_ref(z, c_dim, mask), rows_ref(g, c_dim, mask)
    nu = state["ema_gz"].double()
    dx_in = (g - nu.view(shape) * z) / torch.sqrt(var + eps).view(shape)
    new_nu = nu * (1 - (1 - alpha_bkw) * zr.square().mean(0)) + (1 - alpha_bkw) * (gr * zr).mean(0)
    dx = dx_in if group_num is None else torch.autograd.grad(x_in, x64, dx_in)[0]
    dims = [d for d in range(x.dim()) if d != c_dim]
    new_state = {"running_phi": new_phi, "ema_gz": new_nu, "step": torch.tensor(t)}
    return y, dx, (dy64 * z).sum(dims), dy64.sum(dims), new_state
