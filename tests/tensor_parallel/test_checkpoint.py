"""Save a TP=2 model (full tensors and torch.distributed.checkpoint), load at TP=1, 3, 4: same outputs."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distnorm.comm import count_collectives
from distnorm.tensor_parallel import CRMSNorm, ShardedLayerNorm
from distnorm.tensor_parallel.checkpoint import (
    dcp_state_dict,
    full_state_dict,
    load_dcp_state_dict,
    load_full_state_dict,
    shard_layout,
)
from distnorm.testing import simulate, split_for_world
from tests.tensor_parallel.tp_model import HIDDEN, TOKENS, Model, random_full_state


def _save(rank, world, sd, path, x):
    group = dist.group.WORLD
    model = Model(group)
    load_full_state_dict(model, sd)
    with count_collectives() as c:
        full = full_state_dict(model)
    dcp.save(dcp_state_dict(model), checkpoint_id=path)
    return full, model(split_for_world(x, world)[rank]).detach(), c


def _load(rank, world, path, x):
    group = dist.group.WORLD if world > 1 else None
    model = Model(group)  # fresh parameters: all ones / default init
    state = dcp_state_dict(model)
    dcp.load(state, checkpoint_id=path)
    load_dcp_state_dict(model, state)
    return full_state_dict(model), model(split_for_world(x, world)[rank]).detach()


def test_save_at_two_load_at_one_three_four(tmp_path):
    sd = random_full_state(seed=5)
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    saved = simulate(2, _save, 2, sd, str(tmp_path), x, timeout=60)
    y2 = torch.cat([o[1] for o in saved])
    for full, _, c in saved:  # full-tensor round trip
        assert full.keys() == sd.keys()
        for k in sd:
            torch.testing.assert_close(full[k], sd[k], rtol=0, atol=0)
        # one all-gather per sharded parameter: per block fc1 w+b, norm2 w+b, fc2 w
        assert c.counts == {"all_gather": 10}
    for world in (1, 3, 4):
        loaded = simulate(world, _load, world, str(tmp_path), x, timeout=60)
        for full, _ in loaded:
            for k in sd:
                torch.testing.assert_close(full[k], sd[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(torch.cat([o[1] for o in loaded]), y2, rtol=0, atol=1e-12)


def _layout_rank(rank):
    group = dist.group.WORLD
    norm = ShardedLayerNorm(10, group=group)
    crms = CRMSNorm(10, parallel="sharded", group=group)
    return sorted(shard_layout(norm)), sorted(shard_layout(crms)), tuple(dcp_state_dict(norm)["weight"].to_local().shape)


def test_uneven_shards_convert_between_chunk_and_shard_sizes():
    outs = simulate(4, _layout_rank, timeout=60)
    assert outs[0][0] == ["bias", "weight"] and outs[0][1] == ["weight"]
    # DTensor pieces follow torch.chunk (3, 3, 3, 1), not shard_sizes (3, 3, 2, 2)
    assert [o[2] for o in outs] == [(3,), (3,), (3,), (1,)]


def test_bad_full_tensor():
    with pytest.raises(ValueError, match=r"state\['weight'\] must be the full tensor with size 10 along dim 0, got shape \(5,\) \(rank \d of 2\)"):
        simulate(2, _bad_load_rank, timeout=30)


def _bad_load_rank(rank):
    norm = ShardedLayerNorm(10, group=dist.group.WORLD)
    load_full_state_dict(norm, {"weight": torch.ones(5), "bias": torch.zeros(10)})
