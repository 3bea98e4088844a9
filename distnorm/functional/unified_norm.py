"""Unified Normalization (Yang et al., 2022, "Unified Normalization for Accelerating and Stabilizing Transformers").

Per channel, no mean subtraction, foldable at inference (``y = gamma * x / sqrt(rv + eps) + beta``).
One training step ``t`` (1-based), window ``W``, momentum ``m``:

* batch second moment ``x2 = sum_real x^2 / n`` over the real elements of the global batch;
* window: ``buffer_x2[t % W] = x2``. Adaptive outlier filtration (after ``warmup_iters``, if on):
  when for any channel the window's arithmetic mean minus its geometric mean exceeds
  ``W * var(sqrt(buffer_x2 before the update))``, the step is *skipped*: its slot gets
  ``running_var`` instead and ``skip_counter`` counts it;
* fluctuation smoothing: the normaliser is the window's geometric mean, except while
  ``t <= W``, ``t < warmup_iters`` or on a skipped step (then ``x2`` itself);
* gradient compensation ratio ``r = clamp(sqrt(var + eps) / sqrt(rv + eps), 0.2, 5)``, 1 while
  ``t <= max(ratio_warmup_iters, warmup_iters)`` or on a skipped step;
  ``running_var = m * running_var + (1 - m) * var``; ``z = x / sqrt(var + eps)``;
* backward (approximate, as PowerNorm): ``g = gamma * dy * r``, ``gz = sum_real g * z / n``,
  ``buffer_gz[t % W] = gz`` (``ema_gz`` on a skipped step), ``mean_gz`` = window mean of
  ``buffer_gz`` (``gz`` while ``t <= W``, ``t < warmup_iters`` or skipped),
  ``ema_gz = m * ema_gz + (1 - m) * mean_gz``,
  ``dx = (g - c * z) / sqrt(var + eps)`` with ``c = mean_gz`` on a skipped step else the new
  ``ema_gz``; ``dgamma = sum dy * r * z``, ``dbeta = sum dy``.

Data parallel: ``[sum_real x^2 (C), n]`` is all-reduced in the forward and ``sum_real g * z (C)``
in the backward, so every rank holds the same windows and takes the same skip decision. Every
branch is a tensor ``where`` on the step buffer: no host sync. The authors' code averages ``g*z``
over padded positions too and hard-codes ``ratio_warmup_iters=1000``; here means are over real
elements and the constant is an argument.
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
from distnorm.functional.power_norm import power_norm_eval

__all__ = ["unified_norm", "unified_norm_ref", "unified_norm_step"]

RATIO_MIN, RATIO_MAX = 0.2, 5.0


def _geo_mean(buf: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.log(buf).mean(0))


class _UnifiedNormFn(torch.autograd.Function):
    """``x -> gamma * x * scale + beta`` with UN's ratio-compensated approximate backward.

    ``ema_gz``, ``buffer_gz`` (and ``skips``, or None) advance in the backward: ctx attributes,
    not saved tensors, so two forwards may precede one backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor,
        ratio: torch.Tensor, step_info: torch.Tensor, n: torch.Tensor, backward_state: tuple[torch.Tensor, ...],
        skips: torch.Tensor | None, mask: torch.Tensor | None, hparams: tuple[float, int, int, int], group: Group,
    ) -> torch.Tensor:
        momentum, window, warmup_iters, c_dim = hparams
        sdt = scale.dtype
        vs = vec_shape(x, c_dim)
        z = x.to(sdt) * scale.view(vs)
        y = z if weight is None else z * weight.to(sdt).view(vs)
        if bias is not None:
            y = y + bias.to(sdt).view(vs)
        ctx.save_for_backward(z, scale, ratio, step_info, n, weight, mask)
        ctx.backward_state, ctx.skips = backward_state, skips
        ctx.c_dim, ctx.momentum, ctx.window, ctx.warmup_iters, ctx.group = c_dim, momentum, window, warmup_iters, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        z, scale, ratio, step_info, n, weight, mask = ctx.saved_tensors
        ema_gz, buffer_gz = ctx.backward_state
        c_dim, m, window = ctx.c_dim, ctx.momentum, ctx.window
        t, skip, slot = step_info[0], step_info[1] > 0, step_info[2:].long()
        vs = vec_shape(z, c_dim)
        dys = dy.to(z.dtype)
        g = dys * ratio.view(vs)
        if weight is not None:
            g = g * weight.to(z.dtype).view(vs)
        gz = channel_sum(g * z, c_dim, mask_weight(z, c_dim, mask, z.dtype))
        comm.all_reduce_(gz, ctx.group)
        gz = gz / n
        ema = ema_gz.to(z.dtype)
        new_buf = buffer_gz.to(z.dtype).index_copy(0, slot, torch.where(skip, ema, gz)[None])
        mean_gz = torch.where((t <= window) | (t < ctx.warmup_iters) | skip, gz, new_buf.mean(0))
        new_ema = m * ema + (1 - m) * mean_gz
        commit_([buffer_gz, ema_gz], [new_buf, new_ema], ctx.skips)
        correction = torch.where(skip, mean_gz, new_ema)
        dx = (g - correction.view(vs) * z) * scale.view(vs)
        dweight = None if weight is None else channel_sum(dys * ratio.view(vs) * z, c_dim, None).to(weight.dtype)
        dbias = channel_sum(dys, c_dim, None).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None, None, None, None, None, None


STATE_NAMES = ("running_var", "num_batches_tracked", "buffer_x2", "skip_counter")


def unified_norm_step(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    backward_state: tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float = 1e-5,
    momentum: float = 0.9,
    window_size: int = 4,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    ratio_warmup_iters: int = 1000,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    group: Group = None,
    skips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Unified Normalization training forward from an explicit state: ``(y, new_state)``.

    ``state`` = float64 :func:`~distnorm.functional._norm_utils.pack_state` of ``(running_var [C],
    step [], buffer_x2 [W, C], skip_counter [])`` before the step; ``new_state`` the same after it
    (the caller commits it). ``backward_state = (ema_gz [C], buffer_gz [W, C])`` advance in the
    backward (guarded by ``skips`` when given). Collectives (P > 1): fwd 1 all-reduce of ``C + 1``
    numbers (stats dtype); bwd 1 all-reduce of ``C``.
    """
    c_dim = channel_dim % x.dim()
    sdt = stats_dtype(x.dtype)
    c, window = x.shape[c_dim], window_size
    x2, n = synced_second_moment(x, c_dim, mask, group, "UnifiedNorm")
    with torch.no_grad():
        rv, step, buf, skip_count = state[:c], state[c:c + 1], state[c + 1:c + 1 + window * c], state[-2:-1]
        buf = buf.view(window, c)
        t = step[0] + 1
        slot = (t % window).long().reshape(1)
        recorded_var = torch.sqrt(buf).var()
        new_buf = buf.index_copy(0, slot, x2[None])
        outlier = torch.zeros((), dtype=torch.bool, device=x.device)
        if outlier_filtration:
            spread = new_buf.mean(0) - _geo_mean(new_buf)
            outlier = (t >= warmup_iters) & (spread > recorded_var * window).any()
            new_buf = torch.where(outlier, buf.index_copy(0, slot, rv[None]), new_buf)
        skip = outlier | (window <= 1)
        var = torch.where((t <= window) | (t < warmup_iters) | skip, x2, _geo_mean(new_buf))
        ratio = torch.sqrt(var + eps) / torch.sqrt(rv + eps)
        ratio = torch.where((t <= max(ratio_warmup_iters, warmup_iters)) | skip,
                            torch.ones_like(ratio), ratio.clamp(RATIO_MIN, RATIO_MAX))
        scale = torch.rsqrt(var + eps)
        step_info = torch.cat([t.reshape(1), skip.to(t.dtype).reshape(1), slot.to(t.dtype)])
        new_state = torch.cat([momentum * rv + (1 - momentum) * var, t.reshape(1), new_buf.reshape(-1),
                               skip_count + outlier.to(skip_count.dtype)])
    hparams = (momentum, window, warmup_iters, c_dim)
    y = _UnifiedNormFn.apply(x, weight, bias, scale.to(sdt), ratio.to(sdt), step_info.to(sdt), n, backward_state,
                             skips, mask, hparams, group)
    return y, new_state


def unified_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: tuple[torch.Tensor, ...],
    *,
    training: bool,
    eps: float = 1e-5,
    momentum: float = 0.9,
    window_size: int = 4,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    ratio_warmup_iters: int = 1000,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> torch.Tensor:
    """Unified Normalization of ``x [..C..]`` -> ``y`` of ``x``'s shape and dtype.

    ``state = (running_var [C], ema_gz [C], step [], buffer_x2 [W, C], buffer_gz [W, C],
    skip_counter [])``, updated in place in training (``step`` +1 and the forward statistics in
    the forward, ``ema_gz``/``buffer_gz`` in the backward). Collectives in training (P > 1): fwd 1
    all-reduce of ``C + 1`` numbers; bwd 1 all-reduce of ``C`` numbers (fp32; fp64 for fp64
    input). Eval, ``group`` None or P == 1: none.
    """
    running_var, ema_gz, step, buffer_x2, buffer_gz, skip_counter = state
    if not training:
        return power_norm_eval(x, weight, bias, running_var, eps=eps, channel_dim=channel_dim).to(x.dtype)
    forward_state = [running_var, step, buffer_x2, skip_counter]
    y, new = unified_norm_step(
        x, weight, bias, read_state_once(forward_state, "unified_norm"), (ema_gz, buffer_gz), eps=eps, momentum=momentum,
        window_size=window_size, warmup_iters=warmup_iters, outlier_filtration=outlier_filtration,
        ratio_warmup_iters=ratio_warmup_iters, channel_dim=channel_dim, mask=mask, group=group)
    commit_(forward_state, unpack_state(new, forward_state), None)
    return y


def unified_norm_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    momentum: float = 0.9,
    window_size: int = 4,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    ratio_warmup_iters: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One Unified Normalization training step on the whole batch, float64, pure (host branches).

    ``state`` keys: ``running_var, ema_gz, step, buffer_x2, buffer_gz, skip_counter`` (before the
    step). Returns ``(y, dx, dweight, dbias, new_state)``.
    """
    c_dim = channel_dim % x.dim()
    win = window_size
    shape = [1] * x.dim()
    shape[c_dim] = -1
    x64, dy64, w, b = x.double(), dy.double(), weight.double(), bias.double()
    t = int(state["step"]) + 1
    rv = state["running_var"].double()
    buf_x2 = state["buffer_x2"].double().clone()
    buf_gz = state["buffer_gz"].double().clone()
    ema = state["ema_gz"].double()
    skips = int(state["skip_counter"])
    x2 = rows_ref(x64, c_dim, mask).square().mean(0)
    recorded = torch.sqrt(buf_x2).flatten().var()
    buf_x2[t % win] = x2
    skip = win <= 1
    if outlier_filtration and t >= warmup_iters:
        am, gm = buf_x2.mean(0), torch.exp(torch.log(buf_x2).mean(0))
        if bool(((am - gm) > recorded * win).any()):
            buf_x2[t % win] = rv
            skip, skips = True, skips + 1
    var = x2 if (t <= win or t < warmup_iters or skip) else torch.exp(torch.log(buf_x2).mean(0))
    if t <= max(ratio_warmup_iters, warmup_iters) or skip:
        ratio = torch.ones_like(var)
    else:
        ratio = (torch.sqrt(var + eps) / torch.sqrt(rv + eps)).clamp(RATIO_MIN, RATIO_MAX)
    z = x64 / torch.sqrt(var + eps).view(shape)
    y = z * w.view(shape) + b.view(shape)
    g = dy64 * w.view(shape) * ratio.view(shape)
    gz = (rows_ref(g, c_dim, mask) * rows_ref(z, c_dim, mask)).sum(0) / rows_ref(z, c_dim, mask).shape[0]
    buf_gz[t % win] = ema if skip else gz
    mean_gz = gz if (t <= win or t < warmup_iters or skip) else buf_gz.mean(0)
    new_ema = momentum * ema + (1 - momentum) * mean_gz
    correction = mean_gz if skip else new_ema
    dx = (g - correction.view(shape) * z) / torch.sqrt(var + eps).view(shape)
    dims = [d for d in range(x.dim()) if d != c_dim]
    new_state = {
        "running_var": momentum * rv + (1 - momentum) * var, "ema_gz": new_ema, "step": torch.tensor(t),
        "buffer_x2": buf_x2, "buffer_gz": buf_gz, "skip_counter": torch.tensor(skips),
    }
    return y, dx, (dy64 * ratio.view(shape) * z).sum(dims), dy64.sum(dims), new_state
