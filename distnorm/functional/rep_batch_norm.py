"""RepBN and Progressive RepBN (Guo et al., 2024, SLAB: "Efficient Transformers with Simplified
Linear Attention and Progressive Re-parameterized Batch Normalization").

* RepBN: ``y = BN(x) + alpha * x`` with a learnable scalar ``alpha`` (init 1). In eval the whole
  thing is one per-channel affine map, foldable into the next Linear.
* PRepBN: ``y = lam * LN(x) + (1 - lam) * RepBN(x)`` in training, with
  ``lam = clamp((warmup + decay - step) / decay, 0, 1)``: pure LayerNorm for ``warmup`` steps, then
  a linear decay to pure RepBN over ``decay`` steps. Eval is pure RepBN, so the schedule must end
  before training does (SLAB issues #3 and #6: a schedule that has not finished leaves the model
  evaluated in a form it never trained in).

The batch statistics are those of the global data-parallel batch, from the one batch-norm op of
:mod:`distnorm.functional.batch_norm` (exact moments, one all-reduce each way; torch's native
kernels when no statistic crosses ranks), so autograd gives exactly the single-process gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distnorm.comm import Group
from distnorm.functional.batch_norm import batch_norm_eval, batch_norm_train
from distnorm.functional.batch_stats import stats_dtype
from distnorm.functional.reference import batch_norm_ref, layer_norm_ref

__all__ = [
    "progressive_lambda",
    "progressive_rep_bn_ref",
    "rep_batch_norm",
    "rep_batch_norm_ref",
    "synced_batch_norm",
]


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


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
    update: bool | torch.Tensor = True,
    skips: torch.Tensor | None = None,
) -> torch.Tensor:
    """BatchNorm over the global batch of ``group``, differentiable, in the stats dtype (fp32/fp64).

    ``x [..C..] -> y`` (same shape, stats dtype). Training with ``update`` advances the running
    stats in place (unbiased variance from the global count; ``momentum=None``: cumulative average
    over ``num_batches_tracked``), guarded by ``skips`` when given. The op is
    :func:`~distnorm.functional.batch_norm.batch_norm_train`. Collectives in training (P > 1):
    fwd 1 all-reduce of ``2C + 1`` float64; bwd 1 all-reduce of ``2C`` numbers (stats dtype).
    Eval, ``group`` None or P == 1: none.
    """
    sdt = stats_dtype(x.dtype)
    xs, w, b = x.to(sdt), _cast(weight, sdt), _cast(bias, sdt)
    if not training:
        return batch_norm_eval(xs, w, b, running_mean, running_var, eps=eps, channel_dim=channel_dim)
    factor = 1.0 / (num_batches_tracked + 1).to(torch.float64) if momentum is None else momentum
    return batch_norm_train(xs, w, b, running_mean, running_var, num_batches_tracked, momentum=factor, eps=eps,
                            group=group, channel_dim=channel_dim, mask=mask, skips=skips, update=update, where=where)


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
    update: bool | torch.Tensor = True,
    skips: torch.Tensor | None = None,
) -> torch.Tensor:
    """``BN(x) + alpha * x`` over the global batch -> ``x``'s shape and dtype.

    Collectives: those of :func:`synced_batch_norm` (training, P > 1: fwd 1 all-reduce of
    ``2C + 1`` float64, bwd 1 all-reduce of ``2C`` numbers); none in eval.
    """
    xs = x.to(stats_dtype(x.dtype))  # one cast: every path's gradient meets in the stats dtype
    y = synced_batch_norm(xs, weight, bias, running_mean, running_var, num_batches_tracked, training=training,
                          momentum=momentum, eps=eps, channel_dim=channel_dim, mask=mask, group=group,
                          where="RepBatchNorm", update=update, skips=skips)
    return (y + alpha.to(y.dtype) * xs).to(x.dtype)


def progressive_lambda(step: torch.Tensor, warmup_steps: int, decay_steps: int) -> torch.Tensor:
    """LayerNorm weight of PRepBN at ``step`` (0-based, before the increment), as a tensor: no host sync."""
    return ((warmup_steps + decay_steps - step.double()) / decay_steps).clamp(0.0, 1.0)


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        channel_dim: int) -> torch.Tensor:
    """LayerNorm over the channel dim (per token), in the stats dtype."""
    c_dim = channel_dim % x.dim()
    xs = x.to(stats_dtype(x.dtype)).movedim(c_dim, -1)
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
