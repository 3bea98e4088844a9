"""Finite-difference gradient check of a function that spans ranks.

``torch.autograd.gradcheck`` sees one rank: it perturbs that rank's input and watches that
rank's output, but a collective's backward returns the gradient of the *global* loss. This checks
exactly that. Tensors are either *sharded* (each rank holds its own independent piece) or
*replicated* (one logical tensor held identically by every rank). The global loss is
``L = sum_r <c_r, y_r>`` for a sharded output (independent random cotangents per rank) and
``L = <c, y>`` for a replicated one (the same cotangent everywhere, counted once — what a loss
computed identically on every rank means). Central differences perturb one element of one rank's
input (sharded) or the same element on every rank at once (replicated), every rank re-running
``fn`` in lockstep; autograd's ``dL/dx`` on each rank must match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distnorm import comm

__all__ = ["distributed_gradcheck"]


def distributed_gradcheck(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    group: comm.Group,
    *,
    replicated_input: bool = False,
    replicated_output: bool = False,
    eps: float = 1e-6,
    atol: float = 1e-7,
    rtol: float = 1e-5,
    seed: int = 0,
) -> bool:
    """Check ``fn``'s gradient w.r.t. this rank's ``x`` (float64) against central differences.

    Call it on every rank of ``group`` with the same ``fn`` (and, for ``replicated_input``, the
    same ``x``). Returns True or raises AssertionError naming the rank and element that disagree.
    """
    if x.dtype != torch.float64:
        raise TypeError(f"distributed_gradcheck: x must be float64, got {x.dtype}")
    rank = comm.group_rank(group)
    x = x.detach().clone()
    probe = fn(x)
    g = torch.Generator().manual_seed(seed * 1000 + (0 if replicated_output else rank + 1))
    cot = torch.randn(probe.shape, generator=g, dtype=torch.float64)

    def loss(inp: torch.Tensor) -> float:
        local = (fn(inp) * cot).sum().detach().reshape(1).clone()
        return float(local if replicated_output else comm.all_reduce_(local, group))

    xg = x.clone().requires_grad_()
    (fn(xg) * cot).sum().backward()
    analytic = torch.zeros_like(x) if xg.grad is None else xg.grad

    sources = [None] if replicated_input else list(enumerate(comm.all_gather_object(x.numel(), group)))
    for source in sources:
        src, n = (rank, x.numel()) if source is None else source
        for i in range(n):
            values = []
            for sign in (1.0, -1.0):
                xp = x.clone()
                if src == rank:
                    xp.view(-1)[i] += sign * eps
                values.append(loss(xp))
            numeric = (values[0] - values[1]) / (2 * eps)
            if src == rank:
                a = float(analytic.view(-1)[i])
                if abs(a - numeric) > atol + rtol * abs(numeric):
                    raise AssertionError(
                        f"distributed_gradcheck: rank {rank} element {i}: analytic {a:.10g} vs numeric {numeric:.10g}"
                    )
    return True
