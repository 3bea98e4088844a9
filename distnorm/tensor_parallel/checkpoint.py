"""Checkpoints of tensor-parallel models that load at any TP size.

Sharded parameters (hidden-sharded norms, ``CRMSNorm(parallel="sharded")``, column/row-parallel
linears) are stored either

* as **full tensors** — :func:`full_state_dict` all-gathers every sharded parameter (uneven
  shards from ``shard_sizes``), :func:`load_full_state_dict` keeps this rank's slice; or
* through **torch.distributed.checkpoint** — :func:`dcp_state_dict` returns DTensors sharded on a
  1-D mesh of each module's group, :func:`load_dcp_state_dict` copies what ``dcp.load`` filled in
  back into the parameters. DTensor's ``Shard`` splits like ``torch.chunk`` (``ceil(n/P)`` per
  rank, the last ranks short or empty) while distnorm splits like ``shard_sizes`` (the first
  ``n % P`` ranks one more): the two differ for uneven sizes (10 over 4: 3,3,3,1 vs 3,3,2,2), so
  the conversion goes through the full tensor in both directions instead of relabelling shards.

Replicated parameters and buffers pass through unchanged. Every function is called on every rank
of the model's groups (they issue collectives). The layout rules (which parameter is split along
which dim) are found by module type; nothing is tagged on parameters.

Collectives (P > 1), per sharded parameter: ``full_state_dict`` 1 all-gather; ``dcp_state_dict``
(``to_dcp``) 1 all-gather; ``load_dcp_state_dict`` (``from_dcp``) 1 all-gather; ``load_full_state_dict`` none (``dcp.save`` /
``dcp.load`` issue their own, outside distnorm).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size, shard_offsets, shard_sizes
from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear
from distnorm.tensor_parallel.sharded import ShardedNorm
from distnorm.tensor_parallel.variants import CRMSNorm

__all__ = ["dcp_state_dict", "from_dcp", "full_state_dict", "load_dcp_state_dict", "load_full_state_dict", "shard_layout",
           "to_dcp"]


def shard_layout(model: nn.Module) -> dict[str, tuple[int, int, Group]]:
    """``{state-dict key: (dim, full size along dim, group)}`` of every sharded parameter in ``model``."""
    layout: dict[str, tuple[int, int, Group]] = {}
    for prefix, module in model.named_modules():
        specs: dict[str, tuple[int, int]] = {}
        if isinstance(module, ShardedNorm) or (isinstance(module, CRMSNorm) and module.parallel == "sharded"):
            specs = {"weight": (0, module.hidden), "bias": (0, module.hidden)}
        elif isinstance(module, ColumnParallelLinear):
            specs = {"weight": (0, module.out_features), "bias": (0, module.out_features)}
        elif isinstance(module, RowParallelLinear):
            specs = {"weight": (1, module.in_features)}
        group = getattr(module, "group", None)
        if group_size(group) == 1:
            continue
        for name, (dim, full) in specs.items():
            if getattr(module, name, None) is not None:
                layout[f"{prefix}.{name}" if prefix else name] = (dim, full, group)
    return layout


def _gather_full(t: torch.Tensor, dim: int, full: int, group: Group) -> torch.Tensor:
    return comm.all_gather_uneven(t.detach().contiguous(), group, dim=dim, sizes=shard_sizes(full, group_size(group)))


def _my_slice(full_t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    world, rank = group_size(group), group_rank(group)
    n = full_t.shape[dim]
    return full_t.narrow(dim, shard_offsets(n, world)[rank], shard_sizes(n, world)[rank])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded parameter all-gathered to its full shape (detached)."""
    layout = shard_layout(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        out[key] = _gather_full(value, *layout[key]) if key in layout else value.detach()
    return out


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load full tensors (from :func:`full_state_dict` at any TP size, or a one-device model) into ``model``.

    A full tensor whose extent along the sharded dim is not the module's full size is a ValueError.
    """
    layout = shard_layout(model)
    local: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in layout:
            dim, full, group = layout[key]
            if value.dim() <= dim or value.shape[dim] != full:
                raise ValueError(
                    f"load_full_state_dict: state[{key!r}] must be the full tensor with size {full} along dim "
                    f"{dim}, got shape {tuple(value.shape)} (rank {group_rank(group)} of {group_size(group)})"
                )
            value = _my_slice(value, dim, group)
        local[key] = value
    model.load_state_dict(local, strict=strict)


def _mesh(group: Group, device: torch.device) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device.type)  # type: ignore[arg-type]


def dcp_state_dict(model: nn.Module) -> dict[str, Any]:
    """A ``torch.distributed.checkpoint``-ready state dict: sharded parameters as DTensors.

    Each sharded parameter becomes a DTensor with ``Shard(dim)`` on a 1-D mesh of its module's
    group, holding the ``torch.chunk`` piece of the full tensor (see the module docstring);
    replicated ones stay plain tensors. Pass the same call's result to ``dcp.load`` and then to
    :func:`load_dcp_state_dict` to restore, at any TP size.
    """
    return to_dcp(model.state_dict(), shard_layout(model))


def to_dcp(state: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, int, Group]]) -> dict[str, Any]:
    """``state`` (this rank's tensors) with every entry whose key is in ``layout`` as the DTensor of
    :func:`dcp_state_dict`; other entries detached. For tensors laid out like a model's sharded
    parameters, e.g. an optimizer's moments keyed by parameter name. Collectives (P > 1): 1
    all-gather per sharded entry."""
    from torch.distributed.tensor import DTensor, Shard

    out: dict[str, Any] = {}
    for key, value in state.items():
        if key not in layout:
            out[key] = value.detach()
            continue
        dim, full, group = layout[key]
        full_t = _gather_full(value, dim, full, group)
        world, rank = group_size(group), group_rank(group)
        sizes = _chunk_sizes(full, world)
        piece = full_t.narrow(dim, sum(sizes[:rank]), sizes[rank])
        out[key] = DTensor.from_local(piece.contiguous(), _mesh(group, value.device), [Shard(dim)],
                                      run_check=False, shape=full_t.shape, stride=full_t.stride())
    return out


def from_dcp(state: Mapping[str, Any], layout: Mapping[str, tuple[int, int, Group]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_dcp` after ``dcp.load``: every DTensor back to this rank's
    ``shard_sizes`` slice (its key must be in ``layout``, else ValueError); plain tensors unchanged.
    Collectives (P > 1): 1 all-gather per DTensor."""
    from torch.distributed.tensor import DTensor

    local: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            if key not in layout:
                raise ValueError(f"load_dcp_state_dict: state[{key!r}] is a DTensor but {key!r} is not a sharded "
                                 f"parameter of this model (rank {comm._global_rank()})")
            dim, n, group = layout[key]
            value = _my_slice(comm.all_gather_uneven(value.to_local().contiguous(), group, dim=dim,
                                                     sizes=_chunk_sizes(n, group_size(group))), dim, group)
        local[key] = value
    return local


def load_dcp_state_dict(model: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copy a state dict filled by ``dcp.load`` (built by :func:`dcp_state_dict` on this model) into ``model``."""
    model.load_state_dict(from_dcp(state, shard_layout(model)), strict=strict)


def _chunk_sizes(n: int, world: int) -> list[int]:
    """Extents of ``torch.chunk(range(n), world)`` padded with zeros to ``world`` entries (DTensor's Shard)."""
    step = -(-n // world)
    return [max(0, min(step, n - r * step)) for r in range(world)]
