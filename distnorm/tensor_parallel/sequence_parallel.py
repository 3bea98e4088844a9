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

The math (and the autograd Functions) live in :mod:`distnorm.kernels`: at world 1 and on every rank
these norms run torch's native LayerNorm kernel (CPU), the Triton kernels (CUDA) or the lean
RMSNorm composite, and save only ``x`` and the per-row statistics for backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_size
from distnorm.kernels import stats_dtype
from distnorm.kernels.autograd import sequence_parallel_norm
from distnorm.tensor_parallel._common import DeferredGradSync, NormBase, check_inputs, run_on_local

__all__ = [
    "SequenceParallelLayerNorm",
    "SequenceParallelNorm",
    "SequenceParallelRMSNorm",
    "local_norm",
    "sequence_parallel_norm",
    "sync_sequence_parallel_grads",
]


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
    """One-device norm over the last dim (no collectives): :func:`sequence_parallel_norm` without a group."""
    return sequence_parallel_norm(x, weight, bias, eps, rms=rms, zero_centered_gamma=zero_centered_gamma,
                                  output_scale=output_scale)


class SequenceParallelNorm(NormBase, DeferredGradSync):
    """Base of the sequence-parallel norms: ``weight``/``bias`` replicated, their gradients partial
    sums over this rank's tokens until synchronised (in backward, or by :func:`sync_sequence_parallel_grads`)."""

    def __init__(self, cls: str, normalized_shape: object, eps: float, elementwise_affine: bool, bias: bool, *,
                 grad_sync: str, **kwargs: Any) -> None:
        super().__init__(cls, normalized_shape, eps, elementwise_affine, bias, sharded=False, multi_dim=True,
                         **kwargs)
        self.init_grad_sync(cls, grad_sync, self.group)

    def _norm(self, x: torch.Tensor, rms: bool) -> torch.Tensor:
        cls = type(self).__name__
        self.check_parameters()
        dims = len(self.normalized_shape)
        weight: torch.Tensor | None = self.weight
        bias: torch.Tensor | None = self.bias
        if dims > 1:  # normalise the trailing dims as one row of hidden elements, as nn.LayerNorm does
            weight = None if weight is None else weight.reshape(-1)
            bias = None if bias is None else bias.reshape(-1)

        def fn(x_local: torch.Tensor) -> torch.Tensor:
            if dims > 1:
                if x_local.dim() < dims or tuple(x_local.shape[-dims:]) != self.normalized_shape:
                    raise ValueError(f"{cls}: x trailing dims must be normalized_shape = {self.normalized_shape}, "
                                     f"got shape {tuple(x_local.shape)} {self._where()}")
                x_local = x_local.flatten(-dims)
            check_inputs(cls, x_local, weight, bias, self.hidden, "normalized_shape", self.group)
            y = sequence_parallel_norm(x_local, weight, bias, self.eps, rms=rms, group=self.group,
                                       grad_sync=self.grad_sync, zero_centered_gamma=self.zero_centered_gamma,
                                       output_scale=self.output_scale)
            return y.unflatten(-1, self.normalized_shape) if dims > 1 else y

        return run_on_local(x, fn, sharded_hidden=False, cls=cls, group=self.group, norm_dims=dims)

    def _where(self) -> str:
        return f"(rank {comm.group_rank(self.group)} of {group_size(self.group)})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grad_sync={self.grad_sync!r}"


class SequenceParallelLayerNorm(SequenceParallelNorm):
    """LayerNorm over the trailing ``normalized_shape`` dims of token-sharded activations; parameters replicated.

    ``x [*, *normalized_shape]`` (this rank's tokens, any split; or a DTensor ``Shard(token dim)``) ->
    ``y`` of the same shape in ``x.dtype``; ``normalized_shape`` as ``nn.LayerNorm`` takes it (an int
    or a sequence; stored as a tuple). Stats float32 (float64 for float64 inputs); ``weight`` /
    ``bias`` gradients float32 until after the all-reduce, then cast once to the parameter dtype.
    Collectives (P > 1): fwd none; bwd 1 all-reduce of ``2H`` fp32 numbers per call (fp64 for fp64 x)
    (``grad_sync="backward"``), or none (``"deferred"``: :func:`sync_sequence_parallel_grads`).
    ``group`` None or P == 1: none — torch's native LayerNorm kernel (the Triton kernel on CUDA).
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
                 grad_sync: str = "backward", group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__("SequenceParallelLayerNorm", normalized_shape, eps, elementwise_affine, bias,
                         grad_sync=grad_sync, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                         group=group, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=False)


class SequenceParallelRMSNorm(SequenceParallelNorm):
    """RMSNorm over the trailing ``normalized_shape`` dims of token-sharded activations; ``weight`` replicated.

    ``x [*, *normalized_shape]`` -> ``y`` of the same shape in ``x.dtype``; ``elementwise_affine=False``
    is SRMSNorm. Collectives (P > 1): fwd none; bwd 1 all-reduce of ``H`` fp32 numbers per call
    (fp64 for fp64 x) (``grad_sync="backward"``), or none (``"deferred"``). ``group`` None or P == 1: none.
    """

    has_bias_option = False

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-6, elementwise_affine: bool = True,
                 *, zero_centered_gamma: bool = False, output_scale: float = 1.0, grad_sync: str = "backward",
                 group: Group = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__("SequenceParallelRMSNorm", normalized_shape, eps, elementwise_affine, False,
                         grad_sync=grad_sync, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                         group=group, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, rms=True)


def sync_sequence_parallel_grads(model: nn.Module) -> int:
    """Sum the partial gradients of every ``grad_sync="deferred"`` norm in ``model`` over its group.

    Call after backward, before the optimizer step (before or after DP gradient reduction: the
    two sums commute). Modules are found by type (:class:`DeferredGradSync`: the sequence-parallel
    norms and the replicated-parameter variants), in ``model.modules()`` order, so every rank
    builds the same flat buffer. A parameter whose ``.grad`` is None contributes zeros (and gets
    them), so ranks never disagree on the layout.

    Precision: the partial gradients travel in float32 (float64 for float64 parameters) and are
    cast back to the parameter dtype once, after the sum. A bf16/fp16 parameter's ``.grad`` holds
    each rank's partial already rounded to its dtype by autograd; the sum itself is not rounded
    again (``grad_sync="backward"`` keeps even the partials in float32: docs/precision.md).

    Collectives: 1 all-reduce per distinct (group, device, float32 | float64) of the deferred
    parameters — one per model in the usual case — carrying all their gradient numbers; none for
    groups of size 1. Returns the number of all-reduces issued.
    """
    buckets: dict[tuple[int, torch.dtype, torch.device], tuple[Group, list[nn.Parameter]]] = {}
    for module in model.modules():
        if not isinstance(module, DeferredGradSync) or group_size(module.group) == 1:
            continue
        for p in module.deferred_parameters():
            key = (id(module.group), stats_dtype(p.dtype), p.device)
            buckets.setdefault(key, (module.group, []))[1].append(p)
    for (_, wide, device), (group, params) in buckets.items():
        flat = torch.cat([p.grad.reshape(-1).to(wide) if p.grad is not None else
                          torch.zeros(p.numel(), dtype=wide, device=device) for p in params])
        comm.all_reduce_(flat, group)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            g = g.view(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
    return len(buckets)
