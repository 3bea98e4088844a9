"""Every data-parallel norm composes with the PyTorch training stack as a torch module does, or better.

* torch.compile(fullgraph=True): zero graph breaks, training and eval, equal to eager to round-off
  (outputs, input and parameter gradients, every buffer, skip counters) over 4 training steps, one
  with a NaN input — at world 1 (inductor) and in real gloo processes at world 2.
* Activation checkpointing (non-reentrant, reentrant, selective): gradients and every buffer
  bitwise those of the uncheckpointed module (the state advances once per step), at world 1 and 3;
  a recomputation that cannot be exact raises. (Compile and checkpointing together:
  test_compile_checkpoint.py.)
* Meta-device init: ``to_empty()`` + ``reset_parameters()`` gives a fresh module's every buffer.
* Parameters of the wrong shape (assigned, or through ``functional_call``) raise ValueError.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distnorm.testing import simulate, spawn
from tests.data_parallel._compose import (
    KINDS,
    NORMS,
    STATE_DEPENDENT,
    C,
    batches,
    build,
    max_diff,
    region,
    train,
    world_group,
)

NAMES = sorted(NORMS)


def _compiled_vs_eager(rank: int, world: int, names: list[str], backend: str) -> dict[str, tuple[float, int]]:
    """Per norm: (max |compiled - eager| over everything :func:`train` records, graph breaks)."""
    from torch._dynamo.utils import counters

    out = {}
    for name in names:
        group = world_group(world)
        eager, compiled = build(name, group), build(name, group)
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(compiled, fullgraph=True, backend=backend)
        steps = batches(name, world)
        steps[1][0].view(-1)[-1] = float("nan")  # one non-finite batch (last rank): the guard skips it alike
        ref = train(eager, eager, steps, rank, world)
        got = train(compiled, fn, steps, rank, world)
        for a, b in zip(got, ref, strict=True):  # round-off of float32 values of size ~10
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True,
                                       msg=lambda m, name=name: f"{name} rank {rank}: {m}")
        out[name] = (max_diff(got, ref), sum(counters["graph_break"].values()))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_matches_eager(name):
    with torch._inductor.config.patch(compile_threads=1):
        (_, breaks), = _compiled_vs_eager(0, 1, [name], "inductor").values()
    assert breaks == 0


# Real processes, with a non-finite batch on one rank: one norm per collective pattern (batch-norm op,
# approximate backward, autograd through the moments, EstBN estimates) through dynamo and AOT autograd
# (aot_eager: no C++ build in every process; inductor is pinned at world 1 above). Every norm compiled
# at worlds 2 and 4 without the bad batch: tests/compose/test_compile.py.
SPAWNED = ["SyncBatchNorm", "PowerNorm", "EvoNormB0", "BatchChannelNorm"]


def test_compile_fullgraph_in_real_processes():
    for per_norm in spawn(2, _compiled_vs_eager, 2, SPAWNED, "aot_eager", timeout=600):
        assert set(per_norm) == set(SPAWNED)
        assert all(breaks == 0 for _, breaks in per_norm.values())


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------




def _checkpointed_vs_plain(rank, world, names):
    out = {}
    for name in names:
        steps = batches(name, world)
        plain = build(name, world_group(world))
        ref = train(plain, region(plain, "none"), steps, rank, world)
        for kind in KINDS:
            module = build(name, world_group(world))
            out[name, kind] = max_diff(train(module, region(module, kind), steps, rank, world), ref)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_gives_the_uncheckpointed_gradients_and_state(name):
    # bitwise: the recomputation reads the state the first forward read and advances nothing
    assert _checkpointed_vs_plain(0, 1, [name]) == {(name, kind): 0.0 for kind in KINDS}


def test_checkpoint_with_collectives_on_three_ranks():
    for per_rank in simulate(3, _checkpointed_vs_plain, 3, NAMES, timeout=300):
        assert per_rank == {(name, kind): 0.0 for name in NAMES for kind in KINDS}


@pytest.mark.parametrize("name", sorted(STATE_DEPENDENT))
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_that_cannot_be_exact_raises(name, reentrant):
    module = build(name)
    x1, x2 = (t.requires_grad_() for t, _ in batches(name, steps=2))
    loss = checkpoint(module, x1, use_reentrant=reentrant).sum() + checkpoint(module, x2, use_reentrant=reentrant).sum()
    with pytest.raises(RuntimeError, match=rf"{name}: activation checkpointing recomputes .* 2 forwards of it await "
                                           r"their backward .*rank 0"):
        loss.backward()  # which of the two states did the recomputed forward read? no way to tell


@pytest.mark.parametrize("name", sorted(STATE_DEPENDENT))
def test_checkpoint_recompute_whose_stash_a_plain_forward_dropped_raises(name):
    module = build(name)
    x1, x2 = (t.requires_grad_() for t, _ in batches(name, steps=2))
    loss = checkpoint(module, x1, use_reentrant=False).sum()
    module(x2)  # a training forward with gradients outside any checkpoint: no earlier stash is kept
    with pytest.raises(RuntimeError, match=rf"{name}: activation checkpointing recomputes .* no state of its first "
                                           r"forward is stashed .*rank 0"):
        loss.backward()


@pytest.mark.parametrize("name", sorted(set(NORMS) - STATE_DEPENDENT))
def test_checkpoint_two_forwards_before_backward_when_the_output_ignores_the_state(name):
    steps = batches(name, steps=2)
    results = []
    for kind in ("none", "nonreentrant"):
        module = build(name)
        xs = [x.clone().requires_grad_() for x, _ in steps]
        sum(region(module, kind)(x).mul(dy).sum() for x, (_, dy) in zip(xs, steps)).backward()
        results.append([x.grad for x in xs] + [b.clone() for _, b in sorted(module.named_buffers())])
    assert max_diff(*results) == 0.0


@pytest.mark.parametrize("name", sorted(STATE_DEPENDENT))
@pytest.mark.parametrize("between", ["no_grad", "inference_mode"])
def test_checkpoint_with_a_forward_without_gradients_before_the_backward(name, between):
    # a training forward without gradients (not a checkpoint's: reentrant checkpoint runs its first
    # forward inside an autograd.Function, where forward-mode AD is off too) is never recomputed:
    # the pending recomputation keeps its state, and the result is the uncheckpointed one
    steps = batches(name, steps=2)
    results = []
    for kind in ("none", "nonreentrant", "reentrant"):
        module = build(name)
        x = steps[0][0].clone().requires_grad_()
        y = region(module, kind)(x)
        with getattr(torch, between)():
            look = module(steps[1][0])
        y.mul(steps[0][1]).sum().backward()
        results.append([x.grad, look] + [b.clone() for _, b in sorted(module.named_buffers())])
    assert max_diff(results[0], results[1]) == 0.0 and max_diff(results[0], results[2]) == 0.0


# --------------------------------------------------------------------------------------------
# Meta-device init and parameter shapes
# --------------------------------------------------------------------------------------------


def _state(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_meta_init_then_reset_gives_a_fresh_module(name, dtype):
    fresh = NORMS[name][0](dtype=dtype)
    module = NORMS[name][0](device="meta", dtype=dtype).to_empty(device="cpu")
    for t in _state(module).values():  # what to_empty leaves is garbage: make it loud garbage
        t.data.fill_(7)
    module.reset_parameters()
    expected = _state(fresh)
    assert _state(module).keys() == expected.keys()
    for key, t in _state(module).items():
        assert t.dtype == expected[key].dtype and torch.equal(t, expected[key]), key
    if hasattr(module, "reset_running_stats"):  # statistics only: parameters stay as they are
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1)
        module.reset_running_stats()
        for key, b in module.named_buffers():
            assert torch.equal(b, expected[key]), key


def _wrong_shapes(module):
    """(parameter name, a tensor of the wrong shape) for each parameter of ``module``."""
    return [(n, torch.ones(p.numel() + 1, dtype=p.dtype)) for n, p in module.named_parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_parameters_of_the_wrong_shape_raise(name):
    x = batches(name, steps=1)[0][0]
    for training in (True, False):
        module = NORMS[name][0]().train(training)
        for pname, wrong in _wrong_shapes(module):
            leaf = pname.rsplit(".", 1)[-1]
            with pytest.raises(ValueError, match=rf"parameter {leaf} must have shape \({C},\)|parameter {leaf} must have "
                                                 rf"shape \(1,\)|parameter {pname} must have shape"):
                torch.func.functional_call(module, {pname: wrong}, (x,))
            owner = module.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else module
            saved = getattr(owner, leaf)
            setattr(owner, leaf, nn.Parameter(wrong))
            with pytest.raises(ValueError, match=rf"got \({wrong.numel()},\) \(rank 0"):
                module(x)
            setattr(owner, leaf, saved)
        module(x)  # and the right ones still work
