"""Shared plumbing of the tensor-parallel norms: argument checks, the parameter-holding base, DTensor unwrap."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distnorm.comm import Group, group_rank, group_size

GRAD_SYNC_MODES = ("backward", "deferred")


def where(group: Group) -> str:
    """``(rank r of P)``, the tail of every error message."""
    return f"(rank {group_rank(group)} of {group_size(group)})"


def check_normalized_shape(cls: str, normalized_shape: object, group: Group) -> int:
    """``normalized_shape`` as an int: an int or a 1-tuple/list of one positive int."""
    value = normalized_shape
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{cls}: normalized_shape must be a positive int (the full hidden size), got "
            f"{normalized_shape!r} {where(group)}"
        )
    return value


def check_float(cls: str, name: str, value: object, group: Group, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        expect = "a finite float > 0" if positive else "a finite float"
        raise ValueError(f"{cls}: {name} must be {expect}, got {value!r} {where(group)}")
    return float(value)


def check_inputs(
    cls: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    expected_last: int,
    what: str,
    group: Group,
) -> None:
    """Dtype, device and last-dim checks on a forward's operands (shape/dtype metadata only: no host sync)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{cls}: x must be a floating-point tensor, got {got} {where(group)}")
    if x.dim() == 0 or x.shape[-1] != expected_last:
        raise ValueError(
            f"{cls}: x last dim must be {what} = {expected_last}, got shape {tuple(x.shape)} {where(group)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(
                f"{cls}: {name} must be on x's device {x.device}, got {name} on {p.device} {where(group)}"
            )
        if not p.is_floating_point():
            raise TypeError(f"{cls}: {name} must be floating point, got {p.dtype} {where(group)}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(
            f"{cls}: weight and bias must share a dtype, got weight {weight.dtype} and bias {bias.dtype} "
            f"{where(group)}"
        )


class DeferredGradSync:
    """Marker base: a module whose replicated parameters may hold partial (per-rank) gradients.

    :func:`distnorm.tensor_parallel.sync_sequence_parallel_grads` finds modules by this type and
    sums :meth:`deferred_parameters` over ``group``. ``grad_sync="backward"`` modules sum inside
    their own backward and report none.
    """

    grad_sync: str
    group: Group

    def init_grad_sync(self, cls: str, grad_sync: str, group: Group) -> None:
        if grad_sync not in GRAD_SYNC_MODES:
            raise ValueError(f"{cls}: grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r} {where(group)}")
        self.grad_sync = grad_sync

    def deferred_parameters(self) -> list[nn.Parameter]:
        """Parameters whose ``.grad`` is a per-rank partial sum until synchronised."""
        if self.grad_sync != "deferred" or not isinstance(self, nn.Module):
            return []
        return [p for p in self.parameters(recurse=False) if p.requires_grad]


class NormBase(nn.Module):
    """Parameters (``weight`` / ``bias`` of ``local_size``), ``reset_parameters`` and ``extra_repr``.

    Subclasses set what ``local_size`` means (full hidden size when replicated, this rank's shard
    when hidden-sharded) and implement a one-line ``forward``.
    """

    has_bias_option = True  # LayerNorm-style; RMSNorm-style subclasses set False (no ``bias`` in repr)

    def __init__(
        self,
        cls: str,
        normalized_shape: object,
        eps: float,
        elementwise_affine: bool,
        bias: bool,
        *,
        local_size: Callable[[int], int],
        zero_centered_gamma: bool,
        output_scale: float,
        group: Group,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape(cls, normalized_shape, group)
        self.eps = check_float(cls, "eps", eps, group)
        if self.eps < 0:
            raise ValueError(f"{cls}: eps must be >= 0, got {eps!r} {where(group)}")
        self.output_scale = check_float(cls, "output_scale", output_scale, group)
        self.zero_centered_gamma = bool(zero_centered_gamma)
        self.elementwise_affine = bool(elementwise_affine)
        group_size(group)  # a non-group is a TypeError here, not at the first forward
        self.group = group
        self.local_size = local_size(self.normalized_shape)
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self.local_size, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(self.local_size, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 (stored as 0 with ``zero_centered_gamma``), β = 0."""
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}"
        if self.local_size != self.normalized_shape:
            s += f" (local {self.local_size})"
        s += f", eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.elementwise_affine and self.has_bias_option:
            s += f", bias={self.bias is not None}"
        if self.zero_centered_gamma:
            s += ", zero_centered_gamma=True"
        if self.output_scale != 1.0:
            s += f", output_scale={self.output_scale:g}"
        return s + f", group_size={group_size(self.group)}"


def run_on_local(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], *, sharded_hidden: bool, cls: str, group: Group,
    local_hidden: int | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to a plain tensor, or to a DTensor's local shard and re-wrap (no redistribution).

    Sequence parallel wants ``Shard(d)`` with ``d`` not the last dim (or ``Replicate``: every
    token on every rank, still exact); hidden-sharded wants ``Shard(-1)``. Anything else is a
    ValueError: converting would hide an all-gather.
    """
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return fn(x)
    if not isinstance(x, DTensor):
        return fn(x)
    mesh, placements = x.device_mesh, x.placements
    ok = mesh.ndim == 1 and mesh.size() == group_size(group)
    if ok:
        p = placements[0]
        last = x.dim() - 1
        if sharded_hidden:
            ok = isinstance(p, Shard) and p.dim % x.dim() == last
        else:
            ok = isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % x.dim() != last)
    if not ok:
        expect = "Shard(-1) (hidden dim)" if sharded_hidden else "Shard(d) on a token dim d"
        raise ValueError(
            f"{cls}: a DTensor input must live on a 1-D mesh of the norm's group size "
            f"{group_size(group)} with placement {expect}; got mesh shape {tuple(mesh.shape)}, "
            f"placements {tuple(placements)} {where(group)}"
        )
    x_local = x.to_local()
    if sharded_hidden and local_hidden is not None and x_local.shape[-1] != local_hidden:
        raise ValueError(
            f"{cls}: DTensor input's local hidden shard has {x_local.shape[-1]} columns, the norm's parameters "
            f"{local_hidden}: DTensor's Shard(-1) splits like torch.chunk ({x.shape[-1]} over {mesh.size()}), "
            f"distnorm like shard_sizes (first H % P ranks one more); redistribute or pick H divisible by P "
            f"{where(group)}"
        )
    y_local = fn(x_local)
    return DTensor.from_local(y_local, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())
