"""DTensor inputs with the matching placement give DTensor outputs, with no extra collectives."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from distnorm.comm import count_collectives
from distnorm.tensor_parallel import SequenceParallelRMSNorm, ShardedLayerNorm, SingleScaleRMSNorm
from distnorm.testing import simulate, split_for_world


def _rank(rank, world, x, module_name):
    group = dist.group.WORLD
    mesh = DeviceMesh.from_group(group, "cpu")
    h = x.shape[-1]
    if module_name == "sequence":
        norm, dim = SequenceParallelRMSNorm(h, group=group, dtype=x.dtype), 0
    elif module_name == "sharded":
        norm, dim = ShardedLayerNorm(h, group=group, dtype=x.dtype), -1
    else:
        norm, dim = SingleScaleRMSNorm(h, parallel="sharded", group=group, dtype=x.dtype), -1
    local = split_for_world(x, world, dim)[rank]
    xd = DTensor.from_local(local.clone().requires_grad_(), mesh, [Shard(dim % x.dim())], run_check=False)
    with count_collectives() as c:
        y = norm(xd)
        y.to_local().sum().backward()
    with count_collectives() as c_plain:
        y_plain = norm(local.clone().requires_grad_())
        y_plain.sum().backward()
    return (type(y).__name__, tuple(y.placements), tuple(y.shape), torch.equal(y.to_local(), y_plain.detach()),
            c.counts, c_plain.counts, tuple(y.to_local().shape) == tuple(local.shape))


@pytest.mark.parametrize("module_name", ["sequence", "sharded", "single"])
@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_in_dtensor_out(world, module_name):
    x = torch.randn(8, 3, 12, dtype=torch.float64)
    for name, placements, shape, same, counts, plain_counts, local_kept in simulate(world, _rank, world, x, module_name,
                                                                           timeout=60):
        assert name == "DTensor" and shape == tuple(x.shape) and same and local_kept
        assert placements == ((Shard(0),) if module_name == "sequence" else (Shard(2),))
        assert counts == plain_counts  # exactly the plain path's collectives: no hidden all-gather
        assert "all_gather" not in counts


def _bad_rank(rank, placement):
    group = dist.group.WORLD
    mesh = DeviceMesh.from_group(group, "cpu")
    x = torch.randn(4, 10)
    if placement == "replicate":
        ShardedLayerNorm(10, group=group)(DTensor.from_local(x[:, :3] if rank < 2 else x[:, :2], mesh, [Replicate()]))
    else:  # torch.chunk shards of 10 over 4 are 3, 3, 3, 1; distnorm's are 3, 3, 2, 2
        ShardedLayerNorm(10, group=group)(DTensor.from_local(torch.chunk(x, 4, -1)[rank], mesh, [Shard(1)],
                                                             run_check=False, shape=x.shape, stride=x.stride()))


def test_mismatched_placements_are_errors():
    with pytest.raises(ValueError, match=r"placement Shard\(-1\) \(hidden dim\); got mesh shape \(4,\), placements \(Replicate\(\),\)"):
        simulate(4, _bad_rank, "replicate", timeout=30)
    with pytest.raises(ValueError, match=r"local hidden shard has \d columns, the norm's parameters \d: DTensor's Shard\(-1\) splits like torch.chunk"):
        simulate(4, _bad_rank, "chunk", timeout=30)
