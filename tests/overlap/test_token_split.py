"""TokenWeaver: weaved == unsplit (outputs and all grads), worlds 1-4, both modes; the schedule."""

import functools
import math

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import PendingCollective, count_collectives
from distnorm.overlap import ParallelMLPBlock, TokenSplitPlan, TokenWeaver, plan_token_split, token_split
from distnorm.testing import max_abs_error, simulate, spawn

HIDDEN, FFN, LAYERS = 16, 24, 2


def _blocks(group, dtype):
    """LAYERS blocks, built in float64 from one seed on every rank, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(11)
    blocks = [ParallelMLPBlock(HIDDEN, FFN, group=group, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    for b in blocks:
        with torch.no_grad():
            b.norm_weight.copy_(1 + 0.3 * torch.randn(HIDDEN, generator=gen, dtype=torch.float64))
    return [b.to(dtype) for b in blocks]


def _step(blocks, group, plan, mode, x, residual, dy, dres):
    """Forward + backward of the stack; returns outputs and every gradient (x, residual, params)."""
    for b in blocks:
        b.zero_grad(set_to_none=True)
    x = x.to(blocks[0].norm_weight.dtype).clone().requires_grad_()
    residual = residual.to(x.dtype).clone().requires_grad_()
    weaver = TokenWeaver(blocks, group, plan, mode=mode)
    with count_collectives() as fwd:
        y, res_out = weaver(x, residual)
    ((y * dy.to(y.dtype)).sum() + (res_out * dres.to(y.dtype)).sum()).backward()
    tensors = [y.detach(), res_out.detach(), x.grad, residual.grad]
    # the row-parallel bias is added on TP rank 0 only: elsewhere its gradient is None
    tensors += [torch.zeros_like(p) if p.grad is None else p.grad for b in blocks for p in b.parameters()]
    return tensors, fwd.counts


def _rank(rank, world, mode, dtype, plan, x, residual, dy, dres):
    group = dist.group.WORLD if world > 1 else None
    ref, _ = _step(_blocks(group, torch.float64), group, None, mode, x, residual, dy, dres)
    blocks = _blocks(group, dtype)
    unsplit, unsplit_counts = _step(blocks, group, None, mode, x, residual, dy, dres)
    weaved, weaved_counts = _step(blocks, group, plan, mode, x, residual, dy, dres)
    return ref, unsplit, weaved, unsplit_counts, weaved_counts


def _inputs(tokens):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens,first", [(7, 3), (12, 5), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_weaved_equals_unsplit(mode, world, tokens, first, dtype):
    plan = TokenSplitPlan(num_tokens=tokens, first=first)
    outs = simulate(world, _rank, world, mode, dtype, plan, *_inputs(tokens), timeout=120)
    names = ["normed", "residual_out", "d x", "d residual"] + [f"d param {i}" for i in range(5 * LAYERS)]
    for rank, (ref, unsplit, weaved, unsplit_counts, weaved_counts) in enumerate(outs):
        for name, r, u, w in zip(names, ref, unsplit, weaved, strict=True):
            err, scale = max_abs_error(w, u), float(r.abs().max())
            if dtype == torch.float64:
                assert err <= 1e-12 * scale, f"{name} rank {rank}: weaved vs unsplit {err:.3e}"
            elif dtype == torch.float32:
                assert err <= 1e-5 * scale, f"{name} rank {rank}: weaved vs unsplit {err:.3e}"
            else:  # within 2x the unsplit run's own error vs float64
                bound = 2 * max_abs_error(u, r)
                if name.startswith("d param") and scale > 0:
                    # a parameter used by both halves gets two bf16 gradients that autograd adds in
                    # bf16: one more rounding than the unsplit run (as with micro-batch accumulation)
                    bound += 2.0 ** (math.floor(math.log2(scale)) - 7)
                assert max_abs_error(w, r) <= bound, f"{name} rank {rank}: {max_abs_error(w, r):.3e} > {bound:.3e}"
        halves = 2 if plan.split else 1
        if world == 1:
            assert unsplit_counts == weaved_counts == {}
        elif mode == "allreduce":
            assert unsplit_counts == {"all_reduce": LAYERS}
            assert weaved_counts == {"all_reduce": halves * LAYERS}
        else:  # + one all-gather per half of the token-sharded residual on exit
            assert unsplit_counts == {"reduce_scatter": LAYERS, "all_gather": LAYERS + 1}
            assert weaved_counts == {"reduce_scatter": halves * LAYERS, "all_gather": halves * (LAYERS + 1)}


class _RecordingLauncher:
    """A world of one whose collectives log when they are issued and waited for."""

    world = 1

    def __init__(self, log):
        self.log = log

    def _issue(self, x):
        name = "A" if x.shape[0] == 3 else "B"
        self.log.append(f"issue {name}")

        def finish():
            self.log.append(f"wait {name}")
            return x

        return PendingCollective(None, finish)

    def all_reduce(self, x):
        return self._issue(x)

    def reduce_scatter(self, x, sizes):
        return self._issue(x)

    def all_gather(self, x, sizes):
        return self._issue(x)


def test_schedule_overlaps_each_half_with_the_others_compute(monkeypatch):
    log = []
    monkeypatch.setattr(token_split, "make_launcher", lambda *a, **k: _RecordingLauncher(log))
    blocks = _blocks(None, torch.float64)
    for b in blocks:
        original = b.partial

        def partial(x, original=original):
            log.append(f"compute {'A' if x.shape[0] == 3 else 'B'}")
            return original(x)

        b.partial = partial
    x, residual, *_ = _inputs(7)
    TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3))(x, residual)
    assert log == [
        "compute A", "issue A", "compute B", "issue B", "wait A",   # block 0: B computes while A communicates
        "compute A", "issue A", "wait B", "compute B", "issue B", "wait A",  # block 1: A1 overlaps B0's comm
        "wait B",
    ]


def test_callable_plan_and_plan_mismatch():
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(12)
    planner = functools.partial(plan_token_split, hidden=HIDDEN, world=1)
    y, _ = TokenWeaver(blocks, None, planner)(x, residual)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match=r"plan is for num_tokens=7, got an input of 12 tokens .*\(rank 0\)"):
        TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3))(x, residual)


def test_bad_weaver_arguments():
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(7)
    with pytest.raises(ValueError, match=r"x and residual must both be \[tokens, hidden\].*got \(7, 16\) and \(6, 16\)"):
        TokenWeaver(blocks, None)(x, residual[:6])
    with pytest.raises(TypeError, match=r"residual dtype must equal x's torch.float64, got torch.float32"):
        TokenWeaver(blocks, None)(x, residual.float())
    with pytest.raises(TypeError, match=r"blocks\[0\] \(Linear\) must have partial\(x\) and norm_weight"):
        TokenWeaver([torch.nn.Linear(2, 2)], None)
    with pytest.raises(ValueError, match=r"blocks must be a non-empty sequence, got 0 blocks \(rank 0 of 1\)"):
        TokenWeaver([], None)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'mpi' \(rank 0 of 1\)"):
        TokenWeaver(blocks, None, backend="mpi")  # type: ignore[arg-type]


def _stand_in_rank(rank):
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"stand_in replaces the collective of a one-device benchmark; got a group "
                                         r"of 2 ranks"):
        TokenWeaver(_blocks(group, torch.float64), group, stand_in=lambda t: None)
    return True


def test_stand_in_needs_a_world_of_one():
    assert all(simulate(2, _stand_in_rank, timeout=60))
    calls = []
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(7)
    y, r = TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3), stand_in=calls.append)(x, residual)
    y_ref, r_ref = TokenWeaver(blocks, None)(x, residual)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=1e-12)
    assert [c.shape[0] for c in calls] == [3, 4] * LAYERS


def _spawn_rank(rank):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    x, residual, dy, dres = _inputs(12)
    blocks = _blocks(group, torch.float64)
    result = {}
    for mode in ("allreduce", "reduce_scatter"):
        unsplit, _ = _step(blocks, group, None, mode, x, residual, dy, dres)
        weaved, counts = _step(blocks, group, TokenSplitPlan(num_tokens=12, first=6), mode, x, residual, dy, dres)
        result[mode] = max(max_abs_error(w, u) for w, u in zip(weaved, unsplit, strict=True)), counts
    return result


def test_real_gloo_processes():
    for result in spawn(2, _spawn_rank, timeout=120):
        for mode, (err, counts) in result.items():
            assert err <= 1e-12
            assert counts == ({"all_reduce": 2 * LAYERS} if mode == "allreduce"
                              else {"reduce_scatter": 2 * LAYERS, "all_gather": 2 * (LAYERS + 1)})
