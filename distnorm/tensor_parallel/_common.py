"""Shared plumbing of the tensor-parallel norms: argument checks, the parameter-holding base, DTensor unwrap."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distnorm.comm import Group, group_size
from distnorm.kernels._checks import GRAD_SYNC_MODES, local_shard_size
from distnorm.kernels._checks import check_norm_inputs as check_inputs
from distnorm.kernels._checks import where_in as where

__all__ = [
    "GRAD_SYNC_MODES",
    "DeferredGradSync",
    "NormBase",
    "ShapeChecked",
    "check_float",
    "check_inputs",
    "check_normalized_shape",
    "run_on_local",
    "where",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_normalized_shape(cls: str, normalized_shape: object, group: Group, *,
                           multi_dim: bool = False) -> tuple[int, ...]:
    """``normalized_shape`` as ``torch.nn.LayerNorm`` stores it: a tuple of positive ints.

    Accepts what ``nn.LayerNorm`` accepts — an int (numpy integers included) or a list / tuple /
    ``torch.Size`` of them — and, unless ``multi_dim``, only one dim (the hidden-sharded norms
    split one hidden dim; the variants normalise one).
    """
    value = normalized_shape
    dims = (value,) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list, torch.Size)) else None
    ok = dims is not None and len(dims) >= 1 and all(_is_int(d) and int(d) >= 1 for d in dims)
    if not ok or (dims is not None and len(dims) > 1 and not multi_dim):
        expect = ("a positive int or a sequence of positive ints (as torch.nn.LayerNorm takes)" if multi_dim
                  else "a positive int (the full hidden size) or a one-element sequence of it")
        raise ValueError(f"{cls}: normalized_shape must be {expect}, got {normalized_shape!r} {where(group)}")
    return tuple(int(d) for d in dims)  # type: ignore[union-attr]


def check_float(cls: str, name: str, value: object, group: Group, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        expect = "a finite float > 0" if positive else "a finite float"
        raise ValueError(f"{cls}: {name} must be {expect}, got {value!r} {where(group)}")
    return float(value)


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

    def grad_group(self) -> Group:
        """The group the backward sums the replicated parameters' gradients over (None when deferred)."""
        return self.group if self.grad_sync == "backward" and group_size(self.group) > 1 else None


class ShapeChecked:
    """Parameters keep the shapes the module was built with. A mismatch assigned, or passed through
    ``torch.func.functional_call``, is a ValueError at the next forward naming the parameter, both
    shapes and the rank (shape metadata only: no host sync, compile-friendly); one in a state dict is
    torch's ``load_state_dict`` RuntimeError ("size mismatch for ..."), with the expectation and the
    rank added."""

    group: Group

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{parameter name: (shape, what the shape is)}`` of every parameter the module holds."""
        raise NotImplementedError

    def _shape_error(self, name: str, shape: tuple[int, ...], how: str) -> ValueError:
        expected, what = self.expected_shapes()[name]
        return ValueError(f"{type(self).__name__}: {name}{how} has shape {shape}, expected {expected} ({what}) "
                          f"{where(self.group)}")

    def check_parameters(self) -> None:
        """Raise if ``weight`` / ``bias`` no longer have the shapes the module was built with."""
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        shapes = self._param_shapes
        if (weight is not None and weight.shape != shapes[0]) or (bias is not None and bias.shape != shapes[1]):
            for name, (expected, _) in self.expected_shapes().items():
                p = getattr(self, name)
                if p is not None and tuple(p.shape) != expected:
                    raise self._shape_error(name, tuple(p.shape), "")

    @property
    def _param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shapes = self.expected_shapes()
        return shapes["weight"][0], shapes["bias"][0]

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, (expected, what) in self.expected_shapes().items():
            tag = f"size mismatch for {prefix}{name}:"
            for i, msg in enumerate(error_msgs):  # torch's message names key and both shapes: add what and rank
                if msg.startswith(tag) and "rank" not in msg:
                    error_msgs[i] = f"{msg} {type(self).__name__} expects {expected} ({what}) {where(self.group)}"


class NormBase(ShapeChecked, nn.Module):
    """Parameters, their shape checks, ``reset_parameters`` and ``extra_repr`` of the tensor-parallel norms.

    ``normalized_shape`` is stored as a tuple (as ``nn.LayerNorm``); ``hidden`` is its element count
    (the full normalized size) and ``local_size`` this rank's columns (``hidden``, or
    ``shard_sizes(hidden, P)[rank]`` when ``sharded``). ``weight`` / ``bias`` have shape
    ``param_shape``: ``normalized_shape`` when replicated, ``(local_size,)`` when sharded, ``(1,)``
    for a single-scale gain. Parameters of another shape — assigned, loaded, or passed through
    ``torch.func.functional_call`` — are a ValueError at load or at the next forward (shape
    metadata only: no host sync, nothing that breaks a ``torch.compile`` graph).
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
        sharded: bool,
        zero_centered_gamma: bool,
        output_scale: float,
        group: Group,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        multi_dim: bool = False,
        single_scale: bool = False,
    ) -> None:
        super().__init__()
        group_size(group)  # a non-group is a TypeError here, not at the first forward
        self.normalized_shape = check_normalized_shape(cls, normalized_shape, group, multi_dim=multi_dim)
        self.eps = check_float(cls, "eps", eps, group)
        if self.eps < 0:
            raise ValueError(f"{cls}: eps must be >= 0, got {eps!r} {where(group)}")
        self.output_scale = check_float(cls, "output_scale", output_scale, group)
        self.zero_centered_gamma = bool(zero_centered_gamma)
        self.elementwise_affine = bool(elementwise_affine)
        self.group = group
        self.hidden = math.prod(self.normalized_shape)
        self.local_size = local_shard_size(self.hidden, group, cls=cls) if sharded else self.hidden
        self.param_shape: tuple[int, ...] = (
            (1,) if single_scale else (self.local_size,) if sharded else self.normalized_shape)
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        affine = elementwise_affine or single_scale
        self.weight = nn.Parameter(torch.empty(self.param_shape, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(self.param_shape, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 (stored as 0 with ``zero_centered_gamma``), β = 0: a freshly constructed module's values."""
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def _param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.param_shape, self.param_shape

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        what = ("one gain shared by every column" if self.param_shape == (1,) and self.local_size != 1 else
                f"this rank's hidden shard shard_sizes({self.hidden}, {group_size(self.group)})"
                if self.param_shape != self.normalized_shape else "normalized_shape")
        return {"weight": (self.param_shape, what), "bias": (self.param_shape, what)}

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}"
        if self.local_size != self.hidden:
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
    local_hidden: int | None = None, norm_dims: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to a plain tensor, or to a DTensor's local shard and re-wrap (no redistribution).

    Sequence parallel wants ``Shard(d)`` with ``d`` not one of the ``norm_dims`` normalized dims (or ``Replicate``: every
    token on every rank, still exact); hidden-sharded wants ``Shard(-1)``. Anything else is a
    ValueError: converting would hide an all-gather.
    """
    if type(x) is torch.Tensor or isinstance(x, nn.Parameter):
        return fn(x)
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
            ok = isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % x.dim() < x.dim() - norm_dims)
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
