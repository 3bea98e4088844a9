"""Gradient norm and clipping of a tensor-parallel x data-parallel model, equal to one device's.

``torch.nn.utils.clip_grad_norm_`` on one TP rank sees a slice of every TP-sharded parameter and a
full copy of every replicated one, so its norm is neither the model's nor the same on every rank.
Here the p-norm of all gradients is assembled as a single process would see it::

    total^p = sum over replicated parameters of ||g||^p           (local: every TP rank holds them whole)
            + sum over each TP group of (sum over its sharded parameters of ||g_shard||^p)   (1 all-reduce)

*Sharded* parameters are found by module type, as the checkpoint code finds them
(:func:`distnorm.tensor_parallel.checkpoint.shard_layout`): the weights and biases of
``ShardedLayerNorm`` / ``ShardedRMSNorm`` / ``CRMSNorm(parallel="sharded")``, the weight and bias
of ``ColumnParallelLinear`` and the weight of ``RowParallelLinear``. Everything else is
*replicated* over TP — sequence-parallel norm weights, ``RowParallelLinear`` biases, embeddings —
and counted once. Nothing is read from parameter attributes.

Contract: call after the gradients are complete — replicated gradients already summed over TP
(distnorm's modules do it in backward, or ``sync_sequence_parallel_grads`` for
``grad_sync="deferred"``) and every gradient averaged over DP (DDP, or an explicit all-reduce), so
DP ranks hold equal gradients and compute the same norm without a DP collective. (ZeRO-2/3
partition gradients over DP: there the DeepSpeed integration tells DeepSpeed which parameters are
sharded and DeepSpeed's own clipping computes this norm; see
:func:`distnorm.integrations.deepspeed.mark_tensor_parallel_parameters`.)

The per-tensor norms, the stacking and the clip coefficient are torch's own
(``torch.nn.utils.get_total_norm`` / ``clip_grads_with_norm_``: ``coef = min(1, max_norm /
(total + 1e-6))``, applied without a host sync), so at TP = 1 the result is bit for bit
``torch.nn.utils.clip_grad_norm_``'s.

Collectives: 1 all-reduce of one float (the group's ``sum ||g||^p``, or its max for ``inf``) per
distinct process group that shards parameters of the model; none when nothing is sharded over a
group of more than one rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_size
from distnorm.topology import Topology

__all__ = ["clip_grad_norm_", "grad_norm", "tensor_parallel_parameters"]


def tensor_parallel_parameters(model: nn.Module) -> list[tuple[Group, list[nn.Parameter]]]:
    """The parameters of ``model`` sharded over a TP group of more than one rank, grouped by group.

    ``[(group, [param, ...]), ...]`` in module order, one entry per distinct group object. Found
    by module type (:func:`distnorm.tensor_parallel.checkpoint.shard_layout`); no collectives.
    """
    from distnorm.tensor_parallel.checkpoint import shard_layout

    params = dict(model.named_parameters(remove_duplicate=False))
    by_group: dict[int, tuple[Group, list[nn.Parameter]]] = {}
    for key, (_, _, group) in shard_layout(model).items():
        if key in params:  # a parameter (not a buffer) of a sharded module
            by_group.setdefault(id(group), (group, []))[1].append(params[key])
    return list(by_group.values())


def _check_groups(sharded: list[tuple[Group, list[nn.Parameter]]], topology: Topology) -> None:
    want = dist.get_process_group_ranks(topology.tp_group) if topology.tp_size > 1 else None
    for group, _ in sharded:
        if want is None or dist.get_process_group_ranks(group) != want:  # type: ignore[arg-type]
            raise ValueError(
                f"grad_norm: the model has parameters sharded over a group of ranks "
                f"{dist.get_process_group_ranks(group)} (size {group_size(group)}), but topology.tp_group is "  # type: ignore[arg-type]
                f"{want or 'a single rank'} (tp_size={topology.tp_size}); was the model built for this topology? "
                f"(rank {topology.rank})"
            )


def _norm_of(tensors: Iterable[torch.Tensor], norm_type: float, foreach: bool | None,
             device: torch.device) -> torch.Tensor:
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite=False, foreach=foreach)


@torch.no_grad()
def grad_norm(
    model: nn.Module,
    topology: Topology | None = None,
    *,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """The p-norm of all of ``model``'s gradients, as one device holding the whole model would compute it.

    ``model``: any module tree with distnorm's tensor-parallel modules in it; parameters without a
    gradient count as zero. ``topology``: when given, every sharded module's group must be
    ``topology.tp_group`` (ValueError otherwise: the model was built for another TP degree).
    ``norm_type``: p > 0 or ``inf``. Returns a 0-dim float tensor (the gradients' dtype, on the
    first gradient's device), identical on every rank of the TP group. ``error_if_nonfinite``:
    RuntimeError on every rank when the total is nan/inf (a host sync, as in torch).

    Collectives: 1 all-reduce of one float per distinct group that shards parameters (see the
    module docstring); none at TP = 1.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"grad_norm: model must be an nn.Module, got {type(model).__name__} (rank {comm._global_rank()})")
    p = float(norm_type)
    if not (p > 0 or p == math.inf):
        raise ValueError(f"grad_norm: norm_type must be > 0 or inf, got {norm_type!r} (rank {comm._global_rank()})")
    sharded = tensor_parallel_parameters(model)
    if topology is not None:
        _check_groups(sharded, topology)
    sharded_ids = {id(param) for _, params in sharded for param in params}
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    device = grads[0].device if grads else next(iter(model.parameters()), torch.empty(0)).device
    replicated = [param.grad for param in model.parameters() if param.grad is not None and id(param) not in sharded_ids]
    total = _norm_of(replicated, p, foreach, device)
    if sharded:
        parts = [total]
        for group, params in sharded:
            local = _norm_of([q.grad for q in params if q.grad is not None], p, foreach, device).to(total)
            if p == math.inf:
                parts.append(comm.all_reduce_(local.clone(), group, op="max"))
            else:
                parts.append(comm.all_reduce_(local.pow(p), group).pow(1.0 / p))
        total = torch.linalg.vector_norm(torch.stack(parts), p)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"grad_norm: the total norm of order {p} of the gradients is {float(total)}, so they cannot be "
            f"clipped; set error_if_nonfinite=False to scale them by it anyway (rank {comm._global_rank()})"
        )
    return total


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    topology: Topology | None = None,
    *,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Scale ``model``'s gradients in place so that their global norm is at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_`` for a TP x DP model: the norm is :func:`grad_norm` (the
    single-device model's), the coefficient torch's, ``min(1, max_norm / (total + 1e-6))``,
    multiplied into every gradient without a host sync. Returns the total norm *before*
    clipping (0-dim tensor, identical on every rank). Arguments as in :func:`grad_norm`;
    ``max_norm`` must be a finite float > 0.

    Collectives: those of :func:`grad_norm` (1 all-reduce of one float per sharding group).
    """
    max_norm = float(max_norm)
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"clip_grad_norm_: max_norm must be a finite float > 0, got {max_norm!r} "
                         f"(rank {comm._global_rank()})")
    total = grad_norm(model, topology, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total, foreach=foreach)
    return total
