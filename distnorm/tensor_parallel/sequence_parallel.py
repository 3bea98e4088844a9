"""Sequence-parallel LayerNorm / RMSNorm: tokens split over ``group``, parameters replicated.

Each rank normalises its own tokens (rows are independent: the forward needs no collective).
The weight/bias gradients are sums over *all* tokens, so the per-rank partial gradients must be
summed over ``group``:

* ``grad_sync="backward"`` (default): inside this op's backward, one all-reduce of the flat
  ``[dw, db]`` — any DP wrapper (DDP, FSDP, ZeRO) then sees finished gradients;
* ``grad_sync="deferred"``: the backward leaves the local sums, and
  :func:`sync_sequence_parallel_grads` later reduces every deferred norm of a model in one flat
  all-reduce per (group, dtype) — Megatron's ``finalize_model_grads`` step, but the parameters
  are found by module type, not by attribute tags.

The local math is :mod:`distnorm.functional.layer_norm` (``layer_norm_fwd/bwd``, ``rms_norm_fwd/bwd``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_size
from distnorm.functional.layer_norm import layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd
from distnorm.tensor_parallel._common import (
    GRAD_SYNC_MODES,
    DeferredGradSync,
    NormBase,
    check_inputs,
    run_on_local,
    where,
)

__all__ = [
    "SequenceParallelLayerNorm",
    "SequenceParallelNorm",
    "SequenceParallelRMSNorm",
    "local_norm",
    "sequence_parallel_norm",
    "sync_sequence_parallel_grads",
]


class _SequenceParallelNormFn(torch.autograd.Function):
    """Whole-row norm of this rank's tokens; backward optionally all-reduces flat ``[dw, db]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                rms: bool, zero_centered_gamma: bool, output_scale: float, sync_group: Group) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
        if rms:
            y, rstd = rms_norm_fwd(x2d, weight, eps, **kw)  # type: ignore[arg-type]
            mean = None
        else:
            y, mean, rstd = layer_norm_fwd(x2d, weight, bias, eps, **kw)  # type: ignore[arg-type]
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.kw, ctx.rms, ctx.has_bias, ctx.sync_group = kw, rms, bias is not None, sync_group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2d, weight, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        if ctx.rms:
            dx, dw = rms_norm_bwd(dy2d, x2d, weight, rstd, **ctx.kw)
            db = None
        else:
            dx, dw, db = layer_norm_bwd(dy2d, x2d, weight, mean, rstd, has_bias=ctx.has_bias, **ctx.kw)
        grads = [g for g in (dw, db) if g is not None]
        if grads and group_size(ctx.sync_group) > 1:
            # one collective for dw and db, in the stats dtype (fp32 even for bf16 parameters)
            flat = comm.all_reduce_(torch.cat(grads), ctx.sync_group)
            dw = flat[: dw.numel()] if dw is not None else None
            db = flat[flat.numel() - db.numel():] if db is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx.view(dy.shape), dw, db, None, None, None, None, None


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
) -> torch.Tensor:
    """Norm of this rank's tokens with replicated parameters.

    ``x [*, H]`` (this rank's tokens) -> ``y [*, H]`` in ``x.dtype``; ``weight``/``bias [H]``.
    Collectives (P > 1): fwd none; bwd with ``grad_sync="backward"`` 1 all-reduce of the flat
    ``[dw, db]`` in the stats dtype (4 B per parameter element, 8 for float64 inputs) per call,
    not per token; none with ``"deferred"`` (see :func:`sync_sequence_parallel_grads`).
    ``group`` None or P == 1: none.
    """
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r} {where(group)}")
    sync_group = group if grad_sync == "backward" else None
    return _SequenceParallelNormFn.apply(x, weight, bias, eps, rms, zero_centered_gamma, output_scale, sync_group)


def local_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """One-device norm through the same local math (no collectives)."""
    return _SequenceParallelNormFn.apply(x, weight, bias, eps, rms, zero_centered_gamma, output_scale, None)


class SequenceParallelNorm(NormBase, DeferredGradSync):
    """Base of the sequence-parallel norms: ``weight``/``bias`` replicated, their gradients partial
    sums over this rank's tokens until synchronised (in backward, or by :func:`sync_sequence_parallel_grads`)."""

    def _init_sync(self, cls: str, grad_sync: str) -> None:
        self.init_grad_sync(cls, grad_sync, self.group)

    def _norm(self, x: torch.Tensor, rms: bool) -> torch.Tensor:
        cls = type(self).__name__
        weight, bias = self.weight, self.bias

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            check_inputs(cls, x_local, weight, bias, self.normalized_shape, "normalized_shape", self.group)
            return sequence_parallel_norm(x_local, weight, bias, self.eps, rms=rms, group=self.group,
                                          grad_sync=self.grad_sync, zero_centered_gamma=self.zero_centered_gamma,
                                          output_scale=self.output_scale)

        return run_on_local(x, fn, sharded_hidden=False, cls=cls, group=self.group)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grad_sync={self.grad_sync!r}"


class SequenceParallelLayerNorm(SequenceParallelNorm):
    """LayerNorm over the last dim of token-sharded activations; parameters replicated over ``group``.

    ``x [*, H]`` (this rank's tokens, any split; or a DTensor ``Shard(token dim)``) -> ``y [*, H]``
    in ``x.dtype``. Stats float32 (float64 for float64 inputs), two-pass.
    Collectives (P > 1): fwd none; bwd 1 all-reduce of ``2H`` fp32 numbers per call (fp64 for fp64 x)
    (``grad_sync="backward"``), or none (``"deferred"``: :func:`sync_sequence_parallel_grads`).
    ``group`` None or P == 1: none.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, zero_centered_gamma: bool = False, output_scale: float = 1.0, grad_sync: str = "backward",
                 group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__("SequenceParallelLayerNorm", normalized_shape, eps, elementwise_affine, bias,
                         local_size=lambda h: h, zero_centered_gamma=zero_centered_gamma,
                         output_scale=output_scale, group=group, dtype=dtype, device=device)
        self._init_sync("SequenceParallelLayerNorm", grad_sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=False)


class SequenceParallelRMSNorm(SequenceParallelNorm):
    """RMSNorm over the last dim of token-sharded activations; ``weight`` replicated over ``group``.

    ``x [*, H]`` -> ``y [*, H]`` in ``x.dtype``; ``elementwise_affine=False`` is SRMSNorm.
    Collectives (P > 1): fwd none; bwd 1 all-reduce of ``H`` fp32 numbers per call (fp64 for fp64 x)
    (``grad_sync="backward"``), or none (``"deferred"``). ``group`` None or P == 1: none.
    """

    has_bias_option = False

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True, *,
                 zero_centered_gamma: bool = False, output_scale: float = 1.0, grad_sync: str = "backward",
                 group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__("SequenceParallelRMSNorm", normalized_shape, eps, elementwise_affine, False,
                         local_size=lambda h: h, zero_centered_gamma=zero_centered_gamma,
                         output_scale=output_scale, group=group, dtype=dtype, device=device)
        self._init_sync("SequenceParallelRMSNorm", grad_sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=True)


def sync_sequence_parallel_grads(model: nn.Module) -> int:
    """Sum the partial gradients of every ``grad_sync="deferred"`` norm in ``model`` over its group.

    Call after backward, before the optimizer step (before or after DP gradient reduction: the
    two sums commute). Modules are found by type (:class:`DeferredGradSync`: the sequence-parallel
    norms and the replicated-parameter variants), in ``model.modules()`` order, so every rank
    builds the same flat buffer. A parameter whose ``.grad`` is None contributes zeros (and gets
    them), so ranks never disagree on the layout.

    Collectives: 1 all-reduce per distinct (group, dtype, device) of the deferred parameters —
    one per model in the usual case — carrying all their gradient numbers in the parameter
    dtype; none for groups of size 1. Returns the number of all-reduces issued.
    """
    buckets: dict[tuple[int, torch.dtype, torch.device], list[nn.Parameter]] = {}
    groups: dict[tuple[int, torch.dtype, torch.device], Group] = {}
    for module in model.modules():
        if not isinstance(module, DeferredGradSync) or group_size(module.group) == 1:
            continue
        for p in module.deferred_parameters():
            key = (id(module.group), p.dtype, p.device)
            buckets.setdefault(key, []).append(p)
            groups[key] = module.group
    for key, params in buckets.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        comm.all_reduce_(flat, groups[key])
        offset = 0
        for p in params:
            g = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    return len(buckets)
