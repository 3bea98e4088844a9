"""Argument checks: the launchers' (same errors on the Triton and torch paths) and the norms' entry points."""

from __future__ import annotations

from typing import NoReturn

import torch

from distnorm.comm import Group, _global_rank, group_rank, group_size, shard_sizes

__all__ = [
    "GRAD_SYNC_MODES",
    "KERNEL_DTYPES",
    "check_2d",
    "check_norm_inputs",
    "check_stats",
    "check_vector",
    "fail",
    "local_shard_size",
    "where_in",
]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(exc: type[Exception], where: str, arg: str, value: object, expected: str) -> NoReturn:
    """Raise ``exc`` naming the function, the argument, its value, the expectation and the rank."""
    raise exc(f"{where}: {arg} = {value}, expected {expected} (rank {_global_rank()})")


def check_2d(
    t: torch.Tensor,
    name: str,
    where: str,
    *,
    like: torch.Tensor | None = None,
    same_dtype: bool = True,
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
) -> tuple[int, int]:
    """``t`` is a 2-D float tensor with unit stride along dim 1 (matching ``like``'s shape/device)."""
    if not isinstance(t, torch.Tensor):
        fail(TypeError, where, name, type(t).__name__, "a torch.Tensor")
    if t.dim() != 2:
        fail(ValueError, where, f"{name}.shape", tuple(t.shape), "a 2-D [T, N] tensor (flatten leading dims first)")
    if t.dtype not in dtypes:
        fail(TypeError, where, f"{name}.dtype", t.dtype, f"one of {dtypes}")
    if t.shape[1] == 0:
        fail(ValueError, where, f"{name}.shape", tuple(t.shape), "a non-empty normalized dim N")
    if t.shape[1] > 1 and t.shape[0] > 0 and t.stride(1) != 1:
        fail(ValueError, where, f"{name}.stride()", t.stride(), "unit stride along the normalized dim (call .contiguous())")
    if like is not None:
        if t.shape != like.shape:
            fail(ValueError, where, f"{name}.shape", tuple(t.shape), f"x2d's shape {tuple(like.shape)}")
        if t.device != like.device:
            fail(ValueError, where, f"{name}.device", t.device, f"x2d's device {like.device}")
        if same_dtype and t.dtype != like.dtype:
            fail(TypeError, where, f"{name}.dtype", t.dtype, f"x2d's dtype {like.dtype}")
    return int(t.shape[0]), int(t.shape[1])


def check_vector(t: torch.Tensor | None, name: str, n: int, device: torch.device, where: str) -> None:
    """``t`` is None or a contiguous float ``[n]`` tensor on ``device``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        fail(TypeError, where, name, type(t).__name__, "a torch.Tensor or None")
    if t.shape != (n,):
        fail(ValueError, where, f"{name}.shape", tuple(t.shape), f"({n},) matching x2d.shape[1]")
    if not t.is_floating_point():
        fail(TypeError, where, f"{name}.dtype", t.dtype, "a floating dtype")
    if t.device != device:
        fail(ValueError, where, f"{name}.device", t.device, f"x2d's device {device}")
    if n > 1 and t.stride(0) != 1:
        fail(ValueError, where, f"{name}.stride()", t.stride(), "a contiguous vector")


def check_stats(
    t: torch.Tensor | None, name: str, rows: int, device: torch.device, where: str, *, width: int | None = None
) -> None:
    """``t`` is a contiguous float32 ``[rows]`` (or ``[rows, width]``) statistics tensor on ``device``."""
    shape = (rows,) if width is None else (rows, width)
    if not isinstance(t, torch.Tensor):
        fail(TypeError, where, name, type(t).__name__, f"a float32 tensor of shape {shape}")
    if t.shape != shape:
        fail(ValueError, where, f"{name}.shape", tuple(t.shape), f"{shape} (one row per token of x2d)")
    if t.dtype != torch.float32:
        fail(TypeError, where, f"{name}.dtype", t.dtype, "torch.float32 (statistics are float32)")
    if t.device != device:
        fail(ValueError, where, f"{name}.device", t.device, f"x2d's device {device}")
    if not t.is_contiguous():
        fail(ValueError, where, f"{name}.stride()", t.stride(), "a contiguous tensor")


# ----------------------------------------------------------------------------------------------
# checks of the norms' functional entry points and modules (shape and dtype metadata only: no host
# sync, so they stay inside a torch.compile graph)

GRAD_SYNC_MODES = ("backward", "deferred")


def where_in(group: Group) -> str:
    """``(rank r of P)``, the tail of every error message of a norm bound to ``group``."""
    return f"(rank {group_rank(group)} of {group_size(group)})"


def local_shard_size(hidden: int, group: Group, *, cls: str = "sharded norm") -> int:
    """This rank's column count ``shard_sizes(hidden, P)[rank]``; ValueError if a rank would get none."""
    world = group_size(group)
    if world > hidden:
        raise ValueError(
            f"{cls}: a group of size {world} does not fit normalized_shape = {hidden}: every rank needs "
            f"at least one hidden column (group size <= {hidden}) {where_in(group)}"
        )
    return shard_sizes(hidden, world)[group_rank(group)]


def check_norm_inputs(
    cls: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    expected_last: int,
    what: str,
    group: Group,
    *,
    param_shapes: bool = False,
) -> None:
    """Dtype, device and last-dim checks on a norm's forward operands; with ``param_shapes`` also
    ``weight``/``bias`` of shape ``(expected_last,)`` (the functional entry points, which hold no
    parameters of their own: a ``[1]`` weight would broadcast where torch's ``F.layer_norm`` raises;
    the modules check theirs against the shapes they were built with)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{cls}: x must be a floating-point tensor, got {got} {where_in(group)}")
    if x.dim() == 0 or x.shape[-1] != expected_last:
        raise ValueError(
            f"{cls}: x last dim must be {what} = {expected_last}, got shape {tuple(x.shape)} {where_in(group)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if param_shapes and p.shape != (expected_last,):
            raise ValueError(
                f"{cls}: {name} must have shape ({expected_last},) ({what}), got {tuple(p.shape)} {where_in(group)}"
            )
        if p.device != x.device:
            raise ValueError(
                f"{cls}: {name} must be on x's device {x.device}, got {name} on {p.device} {where_in(group)}"
            )
        if not p.is_floating_point():
            raise TypeError(f"{cls}: {name} must be floating point, got {p.dtype} {where_in(group)}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(
            f"{cls}: weight and bias must share a dtype, got weight {weight.dtype} and bias {bias.dtype} "
            f"{where_in(group)}"
        )
