"""CUDA paths: the stand-in side stream (1 GPU) and the symm_mem backend (>= 2 GPUs).

Skipped without the hardware; run them on a device machine."""

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.overlap import ParallelMLPBlock, TokenSplitPlan, TokenWeaver, fused_allreduce_rms_norm
from distnorm.testing import spawn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="symm_mem needs >= 2 GPUs")


@needs_cuda
def test_stand_in_on_a_side_stream_matches_unsplit():
    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(256, 512, generator=gen, dtype=torch.float64, device="cuda") for _ in range(3)]
    x, residual = torch.randn(2, 1000, 256, dtype=torch.float64, device="cuda").unbind(0)
    sleeps = []

    def stand_in(t):  # long enough that a missing wait would read an unfinished result
        sleeps.append(t.shape[0])
        torch.cuda._sleep(1_000_000)

    y, r = TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=1000, first=512), stand_in=stand_in)(x, residual)
    y_ref, r_ref = TokenWeaver(blocks, None)(x, residual)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=1e-12)
    assert sleeps == [512, 488] * 3


@needs_cuda
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_woven_backward_on_a_side_stream_matches_unsplit(mode):
    """The woven backward's collectives (stand-ins sleeping on a side stream) are waited for by
    stream events: gradients equal the unsplit run's."""
    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(256, 512, generator=gen, dtype=torch.float64, device="cuda", normed_grad="partial")
              for _ in range(3)]
    x, residual, dy = torch.randn(3, 1000, 256, dtype=torch.float64, device="cuda").unbind(0)
    grads = []
    for plan, stand_in in ((None, None), (TokenSplitPlan(num_tokens=1000, first=336, chunks=(336, 336, 328)),
                                          lambda t: torch.cuda._sleep(1_000_000))):
        for b in blocks:
            b.zero_grad(set_to_none=True)
        xg, rg = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y, r = TokenWeaver(blocks, None, plan, mode=mode, normed_grad="partial", stand_in=stand_in)(xg, rg)
        torch.autograd.backward((y, r), (dy, dy))
        grads.append([xg.grad, rg.grad] + [p.grad for b in blocks for p in b.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _symm_rank(rank, mode, partials, residual, weight):
    from torch.distributed import _symmetric_memory as symm_mem

    torch.cuda.set_device(rank)
    group = dist.group.WORLD
    symm_mem.enable_symm_mem_for_group(group.group_name)
    world = dist.get_world_size()
    p = partials[rank].cuda()
    res = residual.cuda() if mode == "allreduce" else residual.cuda().tensor_split(world)[rank]
    results = {}
    for backend in ("nccl", "symm_mem"):
        with count_collectives() as c:
            y, r = fused_allreduce_rms_norm(p, res, weight.cuda(), 1e-6, group=group, mode=mode, backend=backend)
        torch.cuda.synchronize()
        results[backend] = (y.cpu(), r.cpu(), c.counts)
    return results


@needs_2_gpus
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_symm_mem_matches_nccl(mode):
    world = min(torch.cuda.device_count(), 4)
    tokens = 4 * world  # even shards: tensor_split above matches shard_sizes
    partials = torch.randn(world, tokens, 128, dtype=torch.bfloat16)
    residual, weight = torch.randn(tokens, 128, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16)
    for out in spawn(world, _symm_rank, mode, partials, residual, weight, backend="nccl", timeout=300):
        (y_n, r_n, c_n), (y_s, r_s, c_s) = out["nccl"], out["symm_mem"]
        torch.testing.assert_close(y_s, y_n, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(r_s, r_n, rtol=2e-2, atol=2e-2)
        assert c_s == c_n
