"""A 2-layer TP block stack (sequence-parallel norms, parallel linears, sharded FFN norm) vs one device."""

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.tensor_parallel import sync_sequence_parallel_grads
from distnorm.tensor_parallel.checkpoint import load_full_state_dict
from distnorm.testing import simulate, split_for_world
from tests.tensor_parallel.tp_model import HIDDEN, TOKENS, Model, full_grads, random_full_state, torch_model


def _rank(rank, world, sd, x, dy, grad_sync):
    group = dist.group.WORLD if world > 1 else None
    model = Model(group, grad_sync)
    load_full_state_dict(model, sd)
    xs = split_for_world(x, world)[rank].requires_grad_()
    with count_collectives() as c:
        y = model(xs)
        y.backward(split_for_world(dy, world)[rank])
        sync_sequence_parallel_grads(model)
    return y.detach(), xs.grad, full_grads(model), c


@pytest.mark.parametrize("grad_sync", ["backward", "deferred"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_two_layer_block_matches_one_device(world, grad_sync):
    sd = random_full_state()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    dy = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    ref_sd = {k: v.clone().requires_grad_() for k, v in sd.items()}
    x_ref = x.clone().requires_grad_()
    torch_model(x_ref, ref_sd).backward(dy)
    y_ref = torch_model(x, sd)
    outs = simulate(world, _rank, world, sd, x, dy, grad_sync, timeout=60)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), x_ref.grad, rtol=0, atol=1e-10)
    for _, _, grads, c in outs:
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_sd[name].grad, rtol=0, atol=1e-10, msg=name)
        if world == 1:
            assert c.counts == {}
            continue
        # per block: fc1 AG fwd + RS bwd, fc2 RS fwd + AG bwd + bias AR, norm2 AR fwd + bwd;
        # norm1 and the final norm: 1 AR each in backward, or 1 flat AR for all of them deferred
        sp_norm_ars = 3 if grad_sync == "backward" else 1
        assert c.counts == {"all_gather": 4, "reduce_scatter": 4, "all_reduce": 2 * 3 + sp_norm_ars}
