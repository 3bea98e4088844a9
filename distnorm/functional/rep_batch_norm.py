"""RepBN and Progressive RepBN (Guo et al., 2024, SLAB: "Efficient Transformers with Simplified
Linear Attention and Progressive Re-parameterized Batch Normalization").

* RepBN: ``y = BN(x) + alpha * x`` with a learnable scalar ``alpha`` (init 1). In eval the whole
  thing is one per-channel affine map, foldable into the next Linear.
* PRepBN: ``y = lam * LN(x) + (1 - lam) * RepBN(x)`` in training, with
  ``lam = clamp((warmup + decay - step) / decay, 0, 1)``: pure LayerNorm for ``warmup`` steps, then
  a linear decay to pure RepBN over ``decay`` steps. Eval is pure RepBN, so the schedule must end
  before training does (SLAB issues #3 and #6: a schedule that has not finished leaves the model
  evaluated in a form it never trained in).

The batch statistics are those of the global data-parallel batch: local shifted sums
``[sum(x - rm), sum((x - rm)^2), n]`` are all-reduced once in the forward and their gradient once
in the backward (:func:`synced_sum`), so autograd gives exactly the single-process gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distnorm.comm import Group
from distnorm.functional._norm_utils import check_nonempty, synced_sum, vec_shape
from distnorm.functional.batch_stats import channel_sums
from distnorm.functional.reference import batch_norm_ref, layer_norm_ref

__all__ = [
    "progressive_lambda",
    "progressive_rep_bn_ref",
    "rep_batch_norm",
    "rep_batch_norm_ref",
    "synced_batch_norm",
]


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def synced_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
    where: str = "synced_batch_norm",
) -> torch.Tensor:
    """BatchNorm over the global batch of ``group``, differentiable, in the stats dtype (fp32/fp64).

    ``x [..C..] -> y`` (same shape, stats dtype). Training updates the running stats in place
    (unbiased variance from the global count; ``momentum=None``: cumulative average).
    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` numbers; bwd 1 all-reduce of
    ``2C + 1`` numbers. Eval, ``group`` None or P == 1: none.
    """
    c_dim = channel_dim % x.dim()
    sdt = _stats_dtype(x)
    vs = vec_shape(x, c_dim)
    xs = x.to(sdt)
    if training:
        shift = running_mean.detach().to(sdt)
        sums = synced_sum(channel_sums(xs, c_dim, mask, shift, sdt), group)
        c = x.shape[c_dim]
        n = sums[2 * c]
        check_nonempty(n.detach(), where, group)
        d = sums[:c] / n
        var = (sums[c:2 * c] / n - d.square()).clamp_min(0)
        mean = shift + d
        with torch.no_grad():
            num_batches_tracked.add_(1)
            factor = 1.0 / num_batches_tracked.to(sdt) if momentum is None else momentum
            unbiased = var * n / (n - 1).clamp_min(1)
            running_mean.copy_((1 - factor) * running_mean.to(sdt) + factor * mean)
            running_var.copy_((1 - factor) * running_var.to(sdt) + factor * unbiased)
    else:
        mean, var = running_mean.to(sdt), running_var.to(sdt)
    y = (xs - mean.view(vs)) * torch.rsqrt(var + eps).view(vs)
    if weight is not None:
        y = y * weight.to(sdt).view(vs)
    if bias is not None:
        y = y + bias.to(sdt).view(vs)
    return y


def rep_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = -1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> torch.Tensor:
    """``BN(x) + alpha * x`` over the global batch -> ``x``'s shape and dtype.

    Collectives: those of :func:`synced_batch_norm` (training, P > 1: 1 all-reduce of ``2C + 1``
    numbers each way); none in eval.
    """
    xs = x.to(_stats_dtype(x))  # one cast: every path's gradient meets in the stats dtype
    y = synced_batch_norm(xs, weight, bias, running_mean, running_var, num_batches_tracked, training=training,
                          momentum=momentum, eps=eps, channel_dim=channel_dim, mask=mask, group=group,
                          where="RepBatchNorm")
    return (y + alpha.to(y.dtype) * xs).to(x.dtype)


def progressive_lambda(step: torch.Tensor, warmup_steps: int, decay_steps: int) -> torch.Tensor:
    """LayerNorm weight of PRepBN at ``step`` (0-based, before the increment), as a tensor: no host sync."""
    return ((warmup_steps + decay_steps - step.double()) / decay_steps).clamp(0.0, 1.0)


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        channel_dim: int) -> torch.Tensor:
    """LayerNorm over the channel dim (per token), in the stats dtype."""
    c_dim = channel_dim % x.dim()
    xs = x.to(_stats_dtype(x)).movedim(c_dim, -1)
    w = None if weight is None else weight.to(xs.dtype)
    b = None if bias is None else bias.to(xs.dtype)
    return F.layer_norm(xs, (xs.shape[-1],), w, b, eps).movedim(-1, c_dim)


def rep_batch_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, state: dict[str, torch.Tensor],
    *, training: bool = True, momentum: float | None = 0.1, eps: float = 1e-5, channel_dim: int = -1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 RepBN on the whole batch, differentiable: ``(y, new_state)``.

    ``state = {"running_mean", "running_var", "num_batches_tracked"}`` (not modified).
    """
    nbt = int(state["num_batches_tracked"])
    y, rm, rv = batch_norm_ref(x, state["running_mean"], state["running_var"], weight, bias, training=training,
                               momentum=momentum, eps=eps, num_batches_tracked=nbt, channel_dim=channel_dim, mask=mask)
    assert rm is not None and rv is not None
    new_state = {"running_mean": rm.detach(), "running_var": rv.detach(),
                 "num_batches_tracked": torch.tensor(nbt + int(training))}
    return y + alpha.double() * x.double(), new_state


def progressive_rep_bn_ref(
    x: torch.Tensor, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, warmup_steps: int,
    decay_steps: int, training: bool = True, momentum: float | None = 0.1, eps: float = 1e-5,
    channel_dim: int = -1, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 PRepBN step, differentiable: ``(y, new_state)``.

    ``params`` keys: ``layer_norm.weight, layer_norm.bias, rep_bn.weight, rep_bn.bias, rep_bn.alpha``;
    ``state`` keys: ``step, rep_bn.running_mean, rep_bn.running_var, rep_bn.num_batches_tracked``.
    """
    bn_state = {k.removeprefix("rep_bn."): v for k, v in state.items() if k.startswith("rep_bn.")}
    y_bn, bn_state = rep_batch_norm_ref(x, params["rep_bn.weight"], params["rep_bn.bias"], params["rep_bn.alpha"],
                                        bn_state, training=training, momentum=momentum, eps=eps,
                                        channel_dim=channel_dim, mask=mask)
    new_state = {f"rep_bn.{k}": v for k, v in bn_state.items()}
    if not training:
        return y_bn, {**new_state, "step": state["step"]}
    step = int(state["step"])
    lam = min(max((warmup_steps + decay_steps - step) / decay_steps, 0.0), 1.0)
    c_dim = channel_dim % x.dim()
    y_ln = layer_norm_ref(x.movedim(c_dim, -1), params["layer_norm.weight"], params["layer_norm.bias"], eps).movedim(-1, c_dim)
    return lam * y_ln + (1 - lam) * y_bn, {**new_state, "step": torch.tensor(step + 1)}
