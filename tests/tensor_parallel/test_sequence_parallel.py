"""Sequence-parallel LayerNorm/RMSNorm vs the float64 reference on worlds 1-4, both grad_sync modes."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distnorm.comm import count_collectives
from distnorm.tensor_parallel import (
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    sync_sequence_parallel_grads,
)
from distnorm.testing import simulate, split_for_world
from tests.tensor_parallel.norm_cases import DTYPES, Case, check_all, make_case


def _build(case: Case, group, grad_sync):
    h = case.x.shape[-1]
    kw = {"zero_centered_gamma": case.zero_centered_gamma, "output_scale": case.output_scale,
          "grad_sync": grad_sync, "group": group, "dtype": case.x.dtype}
    if case.kind == "layer":
        mod = SequenceParallelLayerNorm(h, case.eps, bias=case.bias is not None, **kw)
    else:
        mod = SequenceParallelRMSNorm(h, case.eps, **kw)
    with torch.no_grad():
        mod.weight.copy_(case.weight)
        if case.bias is not None:
            mod.bias.copy_(case.bias)
    return mod


def _rank(rank, world, cases, grad_sync):
    group = dist.group.WORLD if world > 1 else None
    out = []
    for case in cases:
        mod = _build(case, group, grad_sync)
        x = split_for_world(case.x, world)[rank].requires_grad_()
        with count_collectives() as c_step:
            y = mod(x)
            y.backward(split_for_world(case.dy, world)[rank])
        with count_collectives() as c_sync:
            n = sync_sequence_parallel_grads(mod)
        out.append((y.detach(), x.grad, mod.weight.grad, None if mod.bias is None else mod.bias.grad,
                    c_step, c_sync, n))
    return out


def _cases(kind):
    cases = []
    for hidden in (10, 64):
        for dtype in DTYPES:
            cases.append(make_case(kind, hidden).cast(dtype))
        for dtype in (torch.float32, torch.bfloat16):  # |mean|/std = 1e3
            cases.append(make_case(kind, hidden, offset=1e3, seed=1).cast(dtype))
    cases.append(make_case(kind, 10, zero_centered_gamma=True, output_scale=0.5, seed=2))
    cases.append(make_case(kind, 10, zero_centered_gamma=True, output_scale=0.5, seed=2).cast(torch.bfloat16))
    return cases


@pytest.mark.parametrize("grad_sync", ["backward", "deferred"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference(world, kind, grad_sync):
    cases = _cases(kind)
    outs = simulate(world, _rank, world, cases, grad_sync, timeout=60)
    for i, case in enumerate(cases):
        per_rank = [o[i] for o in outs]
        y = torch.cat([p[0] for p in per_rank])
        dx = torch.cat([p[1] for p in per_rank])
        for p in per_rank:  # replicated parameters: every rank holds the full gradient
            check_all((y, dx, p[2], p[3]), case)
        numel = case.x.shape[-1] * (2 if case.bias is not None else 1)
        nbytes = numel * (8 if case.x.dtype == torch.float64 else 4)
        for *_, c_step, c_sync, n in per_rank:
            if world == 1:
                assert c_step.counts == {} and c_sync.counts == {} and n == 0
            elif grad_sync == "backward":
                assert c_step.counts == {"all_reduce": 1} and c_step.bytes == {"all_reduce": nbytes}
                assert c_sync.counts == {} and n == 0
            else:
                assert c_step.counts == {} and n == 1
                assert c_sync.counts == {"all_reduce": 1}
                # deferred grads travel in float32 (float64 for float64 parameters), cast once after the sum
                assert c_sync.bytes == {"all_reduce": nbytes}


class _Block(nn.Module):
    def __init__(self, group, hidden):
        super().__init__()
        self.ln1 = SequenceParallelLayerNorm(hidden, group=group, grad_sync="deferred", dtype=torch.float64)
        self.proj = nn.Linear(hidden, hidden, dtype=torch.float64)
        self.ln2 = SequenceParallelRMSNorm(hidden, group=group, grad_sync="deferred", dtype=torch.float64)
        self.ln3 = SequenceParallelRMSNorm(hidden, group=group, dtype=torch.float64)  # "backward": not in the flat sync

    def forward(self, x):
        return self.ln3(self.ln2(self.proj(self.ln1(x))))


def _model_rank(rank, world, x, state):
    group = dist.group.WORLD if world > 1 else None
    model = _Block(group, x.shape[-1])
    model.load_state_dict(state)
    x_shard = split_for_world(x, world)[rank]
    model(x_shard).square().sum().backward()
    with count_collectives() as c:
        n = sync_sequence_parallel_grads(model)
    grads = {k: p.grad for k, p in model.named_parameters() if k.startswith("ln")}
    return grads, c, n


def test_deferred_sync_is_one_flat_all_reduce_per_model():
    world, hidden = 3, 10
    torch.manual_seed(0)
    ref = _Block(None, hidden)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(TOKENS := 8, hidden, dtype=torch.float64)
    ref(x).square().sum().backward()
    outs = simulate(world, _model_rank, world, x, ref.state_dict(), timeout=60)
    for grads, c, n in outs:
        assert n == 1
        # ln1 weight+bias and ln2 weight, float64; ln3 synced in its own backward
        assert c.counts == {"all_reduce": 1} and c.bytes == {"all_reduce": 3 * hidden * 8}
        for name, g in grads.items():
            torch.testing.assert_close(g, dict(ref.named_parameters())[name].grad, rtol=0, atol=1e-10)
    assert TOKENS == 8


def test_float16_and_mixed_precision_outputs():
    x = torch.randn(5, 10).to(torch.float16)
    assert SequenceParallelLayerNorm(10, dtype=torch.float16)(x).dtype == torch.float16
    xb = torch.randn(5, 10, dtype=torch.bfloat16, requires_grad=True)
    norm = SequenceParallelRMSNorm(10)  # fp32 parameters, bf16 activations
    y = norm(xb)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x last dim must be normalized_shape = 10, got shape \(2, 8\) \(rank 0 of 1\)"):
        SequenceParallelLayerNorm(10)(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"grad_sync must be one of \('backward', 'deferred'\), got 'later' \(rank 0"):
        SequenceParallelRMSNorm(10, grad_sync="later")
    with pytest.raises(ValueError, match=r"normalized_shape must be a positive int .* got 0 \(rank 0"):
        SequenceParallelRMSNorm(0)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch.int64 \(rank 0"):
        SequenceParallelRMSNorm(4)(torch.ones(2, 4, dtype=torch.long))
    norm = SequenceParallelLayerNorm(4)
    norm.bias.data = norm.bias.data.double()
    with pytest.raises(TypeError, match=r"weight and bias must share a dtype, got weight torch.float32 and bias torch.float64"):
        norm(torch.randn(2, 4))
    norm = SequenceParallelLayerNorm(4, device="meta")
    with pytest.raises(ValueError, match=r"weight must be on x's device cpu, got weight on meta \(rank 0 of 1\)"):
        norm(torch.randn(2, 4))


def _bad_rank(rank):
    SequenceParallelLayerNorm(8, group=dist.group.WORLD)(torch.randn(3, 8 if rank == 0 else 5))


def test_bad_input_names_rank():
    with pytest.raises(ValueError, match=r"got shape \(3, 5\) \(rank 1 of 2\)"):
        simulate(2, _bad_rank, timeout=30)
