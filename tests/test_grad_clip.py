"""dn.grad_norm / dn.clip_grad_norm_: a TP x DP model's norm and clipped gradients equal one device's.

The model (tests/tensor_parallel/tp_model.py, float64) has every kind of parameter: sequence-parallel
norm weights and RowParallelLinear biases (replicated over TP), ColumnParallelLinear weights and
biases, RowParallelLinear weights and ShardedLayerNorm weights (sharded, 14 over 3 or 4 ranks
uneven). The reference is plain torch on the full model: torch.nn.utils.clip_grad_norm_ in float64.
Tolerance: float64 round-off (1e-12 relative), the norm identical on every rank.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm as dn
from distnorm.comm import count_collectives
from distnorm.tensor_parallel.checkpoint import load_full_state_dict
from distnorm.testing import simulate, spawn, split_for_world
from distnorm.topology import init_distributed
from tests.tensor_parallel.tp_model import HIDDEN, TOKENS, Model, full_grads, random_full_state, torch_model

MAX_NORM = 0.05  # well under the gradients' norm (~1-10): clipping is active


def _inputs(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(dp, TOKENS, HIDDEN, generator=g, dtype=torch.float64),
            torch.randn(dp, TOKENS, HIDDEN, generator=g, dtype=torch.float64))


def _reference(state: dict[str, torch.Tensor], dp: int, norm_type: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One device: the mean loss over the dp batches, torch's clip_grad_norm_ on the full parameters."""
    sd = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    x, w = _inputs(dp)
    loss = sum((torch_model(x[i], sd) * w[i]).sum() for i in range(dp)) / dp
    loss.backward()  # type: ignore[union-attr]
    total = torch.nn.utils.clip_grad_norm_(list(sd.values()), MAX_NORM, norm_type=norm_type)
    return total, {k: v.grad for k, v in sd.items()}  # type: ignore[misc]


def _tp_dp_rank(rank: int, state: dict[str, torch.Tensor], tp: int, norm_type: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict, torch.Tensor]:
    topo = init_distributed(tp=tp)
    model = Model(topo.tp_group)
    load_full_state_dict(model, state)
    x, w = _inputs(topo.dp_size)
    x_shard = split_for_world(x[topo.dp_rank], topo.tp_size)[topo.tp_rank]
    w_shard = split_for_world(w[topo.dp_rank], topo.tp_size)[topo.tp_rank]
    (model(x_shard) * w_shard).sum().backward()
    for p in model.parameters():  # average over DP, as DDP would
        dist.all_reduce(p.grad, group=topo.dp_group)
        p.grad /= topo.dp_size
    with count_collectives() as counts:
        total = dn.clip_grad_norm_(model, MAX_NORM, topo, norm_type=norm_type)
    unclipped_check = dn.grad_norm(model, topo, norm_type=norm_type)  # after clipping: ~MAX_NORM
    return total, full_grads(model), counts.as_dict(), unclipped_check


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2)])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_tp_dp_norm_and_clipped_grads_equal_one_device(world: int, tp: int, norm_type: float) -> None:
    state = random_full_state(seed=1)  # from the global RNG (seeded per test by conftest): make it once
    ref_total, ref_grads = _reference(state, world // tp, norm_type)
    assert ref_total > 10 * MAX_NORM  # clipping is active
    outs = simulate(world, _tp_dp_rank, state, tp, norm_type, timeout=90)
    for total, grads, counts, after in outs:
        assert total.dtype == torch.float64 and total.dim() == 0
        torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=0)
        assert total == outs[0][0]  # bitwise the same on every rank
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-12, atol=1e-15, msg=k)
        torch.testing.assert_close(after, torch.tensor(MAX_NORM, dtype=torch.float64), rtol=1e-6, atol=0)
        # one all-reduce of one float64 per sharding group; none at TP = 1
        assert counts == ({"all_reduce": {"count": 1, "bytes": 8}} if tp > 1 else {})


def _plain_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_world_one_is_torch_bit_for_bit(norm_type: float, foreach: bool | None) -> None:
    a, b = _plain_model(), _plain_model()
    x = torch.randn(4, 6)
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    total = dn.clip_grad_norm_(a, 0.1, norm_type=norm_type, foreach=foreach)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1, norm_type=norm_type, foreach=foreach)
    assert total > 0.1 and torch.equal(total, ref)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)  # type: ignore[arg-type]
    assert torch.equal(dn.grad_norm(a, norm_type=norm_type), torch.nn.utils.get_total_norm(
        [p.grad for p in b.parameters()], norm_type))  # type: ignore[misc]


def test_no_clip_below_max_and_missing_grads() -> None:
    m = _plain_model()
    assert dn.grad_norm(m) == 0  # no gradient yet: zero, like torch
    (m(torch.randn(2, 6)).sum() * 1e-3).backward()
    before = [p.grad.clone() for p in m.parameters()]  # type: ignore[union-attr]
    total = dn.clip_grad_norm_(m, 1e3)
    assert total < 1e3 and all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), before, strict=True))


def _nonfinite_rank(rank: int) -> str:
    topo = init_distributed(tp=2)
    model = Model(topo.tp_group)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == 1:  # only rank 1's shard of a sharded weight: every rank must see it
        model.blocks[0].fc1.weight.grad[0, 0] = math.nan
    assert dn.grad_norm(model, topo).isnan()
    try:
        dn.clip_grad_norm_(model, 1.0, topo, error_if_nonfinite=True)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_nonfinite_raises_on_every_rank() -> None:
    for rank, msg in enumerate(simulate(2, _nonfinite_rank, timeout=60)):
        assert "total norm of order 2.0 of the gradients is nan" in msg and f"(rank {rank})" in msg


def _mismatch_rank(rank: int) -> str:
    model = Model(dist.group.WORLD)  # sharded over 2 ranks ...
    topo = init_distributed(tp=1)  # ... but the run is TP = 1 (DP = 2)
    try:
        dn.grad_norm(model, topo)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_model_built_for_another_topology_is_refused() -> None:
    for rank, msg in enumerate(simulate(2, _mismatch_rank, timeout=60)):
        assert "sharded over a group of ranks [0, 1] (size 2)" in msg and "tp_size=1" in msg and f"(rank {rank})" in msg


def test_bad_arguments() -> None:
    m = _plain_model()
    with pytest.raises(ValueError, match=r"max_norm must be a finite float > 0, got 0.0 \(rank 0\)"):
        dn.clip_grad_norm_(m, 0.0)
    with pytest.raises(ValueError, match=r"norm_type must be > 0 or inf, got -1 \(rank 0\)"):
        dn.grad_norm(m, norm_type=-1)


def _spawned_rank(rank: int, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total, grads, _, _ = _tp_dp_rank(rank, state, 2, 2.0)
    return total, grads


def test_real_processes_tp2() -> None:
    state = random_full_state(seed=1)
    ref_total, ref_grads = _reference(state, 1, 2.0)
    for total, grads in spawn(2, _spawned_rank, state, timeout=120):
        torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=0)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-12, atol=1e-15, msg=k)
