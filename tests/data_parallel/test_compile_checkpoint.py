"""torch.compile and activation checkpointing together, for every data-parallel norm.

* torch.compile around a checkpointed region (non-reentrant, selective; reentrant, which dynamo
  traces as non-reentrant): gradients and every buffer bitwise those of the uncheckpointed eager
  module over 4 training steps (backend ``aot_eager``: AOT autograd's min-cut partitioner, the one
  inductor uses, with eager kernels), to round-off with inductor, and in 2 real gloo processes.
* An eager checkpoint around a compiled module (its compiled forward runs again in the backward):
  exact, non-reentrant and reentrant; reentrant raises for the norms whose output depends on state.
* A recomputation that cannot be exact (several compiled forwards before one backward, the module
  twice in one checkpointed region) raises a RuntimeError naming the module and the fix; legitimate
  patterns (plain compile with several forwards, training forwards without gradients in between)
  do not.

Mechanism (distnorm/data_parallel/_state.py): the compiled forward reads its state through the
custom op ``distnorm::read_snapshot``, which returns, when it runs inside a backward (the
partitioner's recomputation, or the eager checkpoint's), the snapshot the forward wrote instead of
the already-advanced buffers; updates are gated by ``distnorm::first_run``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._functorch import config as functorch_config

from distnorm.functional.batch_channel_norm import batch_channel_norm
from distnorm.functional.power_norm import power_norm
from distnorm.functional.unified_norm import unified_norm
from distnorm.testing import spawn
from tests.data_parallel._compose import (
    NORMS,
    STATE_DEPENDENT,
    batches,
    build,
    max_diff,
    region,
    train,
    world_group,
)

NAMES = sorted(NORMS)
# one norm per update path (torch's batch-norm kernel, the synced batch-norm op, EvoNorm's): under a
# reentrant checkpoint the first forward runs without gradients, i.e. through another compiled graph
REENTRANT_PATHS = {"SyncBatchNorm", "SyncBatchNorm[btc,momentum=None]", "EvoNormB0"}
STALE = r"{name}: activation checkpointing recomputes this module's compiled training forward, but another .*rank 0"


def _compiled_region(module, kind, backend="aot_eager"):
    """torch.compile(fullgraph) of a function that checkpoints ``module`` (``kind``)."""
    torch._dynamo.reset()
    return torch.compile(region(module, kind), fullgraph=True, backend=backend)


def _checkpointed_compiled(module, kind, backend="aot_eager"):
    """An eager checkpoint (``kind``) around the compiled module."""
    torch._dynamo.reset()
    return region(module, kind, call=torch.compile(module, fullgraph=True, backend=backend))


def _vs_uncheckpointed(name, make, rank=0, world=1):
    """max |run - uncheckpointed eager run| over everything :func:`train` records, ``make(module)`` the run."""
    steps = batches(name, world)
    plain = build(name, world_group(world))
    ref = train(plain, region(plain, "none"), steps, rank, world)
    module = build(name, world_group(world))
    return max_diff(train(module, make(module), steps, rank, world), ref)


@pytest.mark.parametrize("name", NAMES)
def test_compile_around_checkpoint_is_exact(name):
    kinds = ["nonreentrant"]
    if name in STATE_DEPENDENT:  # selective checkpointing changes what the partitioner saves of their state
        kinds.append("selective")
    if name == "PowerNorm":  # dynamo traces reentrant as non-reentrant: pinned once
        kinds.append("reentrant")
    got = {kind: _vs_uncheckpointed(name, lambda m, kind=kind: _compiled_region(m, kind)) for kind in kinds}
    assert got == dict.fromkeys(kinds, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_eager_checkpoint_around_a_compiled_module(name):
    assert _vs_uncheckpointed(name, lambda m: _checkpointed_compiled(m, "nonreentrant")) == 0.0
    if name not in STATE_DEPENDENT:  # a recomputation only has to advance nothing: exact
        if name in REENTRANT_PATHS:
            assert _vs_uncheckpointed(name, lambda m: _checkpointed_compiled(m, "reentrant")) == 0.0
        return
    # reentrant checkpoint runs the first forward without gradients: that compiled graph cannot know
    # a recomputation will follow, so it leaves no snapshot, and the recomputation says so
    with pytest.raises(RuntimeError, match=STALE.format(name=name)):
        _vs_uncheckpointed(name, lambda m: _checkpointed_compiled(m, "reentrant"))


def test_compile_around_checkpoint_with_inductor():
    # the same partitioner and custom ops through inductor's codegen: round-off of values of size ~10
    with torch._inductor.config.patch(compile_threads=1):
        diff = _vs_uncheckpointed("PowerNorm", lambda m: _compiled_region(m, "nonreentrant", "inductor"))
    assert diff < 1e-4


@pytest.mark.parametrize("name", sorted(STATE_DEPENDENT))
def test_compile_under_an_activation_memory_budget_is_exact(name):
    # torch's activation memory budget lets the partitioner recompute any op, outside checkpointed
    # regions too (budget 0: everything but the inputs); the state read included
    with functorch_config.patch(activation_memory_budget=0.0):
        assert _vs_uncheckpointed(name, lambda m: _compiled_region(m, "none")) == 0.0


def _twice_in_one_region(module, backend="aot_eager"):
    """torch.compile of a checkpointed region that calls ``module`` twice."""
    torch._dynamo.reset()
    return torch.compile(region(module, "nonreentrant", call=lambda t: module(module(t))), fullgraph=True,
                         backend=backend)


PENDING = {  # ways to have two training forwards of one module await one backward
    "two compiled checkpointed forwards": lambda m: _compiled_region(m, "nonreentrant"),
    "twice in one compiled checkpointed region": _twice_in_one_region,
    "eager checkpoint around the compiled module, twice": lambda m: _checkpointed_compiled(m, "nonreentrant"),
}


@pytest.mark.parametrize("case", sorted(PENDING))
@pytest.mark.parametrize("name", sorted(STATE_DEPENDENT))
def test_compiled_recomputation_that_cannot_be_exact_raises(name, case):
    module = build(name)
    run = PENDING[case](module)
    (x1, _), (x2, _) = batches(name, steps=2)
    loss = run(x1.clone().requires_grad_()).sum() + run(x2.clone().requires_grad_()).sum()
    with pytest.raises(RuntimeError, match=STALE.format(name=name)):
        loss.backward()  # the recomputation of the first forward would read the second one's state


def test_compiled_recomputation_after_a_forward_whose_backward_never_ran_raises():
    # indistinguishable from a forward still awaiting its backward when the recomputation comes
    module = build("PowerNorm")
    run = _compiled_region(module, "nonreentrant")
    (x1, _), (x2, _) = batches("PowerNorm", steps=2)
    run(x1.clone().requires_grad_())  # gradients on, backward never called
    loss = run(x2.clone().requires_grad_()).sum()
    with pytest.raises(RuntimeError, match=STALE.format(name="PowerNorm")):
        loss.backward()


def test_plain_compile_with_several_forwards_before_one_backward():
    # no recomputation, no check: two compiled forwards then one backward equal the eager module's
    results = []
    for compiled in (False, True):
        module = build("ProgressiveRepBN")
        torch._dynamo.reset()
        run = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
        xs = [x.clone().requires_grad_() for x, _ in batches("ProgressiveRepBN", steps=2)]
        sum(run(x).mul(dy).sum() for x, (_, dy) in zip(xs, batches("ProgressiveRepBN", steps=2))).backward()
        results.append([x.grad for x in xs] + [b.clone() for _, b in sorted(module.named_buffers())])
    assert max_diff(*results) == 0.0


@pytest.mark.parametrize("name", ["PowerNorm", "ProgressiveRepBN"])
def test_compiled_checkpoint_tolerates_forwards_no_recomputation_needs(name):
    # training-mode forwards without gradients between steps (a look at the outputs, say) advance the
    # state but are never recomputed: no error, and compiled == eager
    def run(make):
        module = build(name)
        fn = make(module)
        out = []
        for i, (x, dy) in enumerate(batches(name, steps=3)):
            if i == 1:
                with torch.no_grad():
                    out.append(fn(x))
            x = x.clone().requires_grad_()
            fn(x).mul(dy).sum().backward()
            out.append(x.grad)
        return out + [b.clone() for _, b in sorted(module.named_buffers())]

    assert max_diff(run(lambda m: region(m, "nonreentrant")), run(lambda m: _compiled_region(m, "nonreentrant"))) == 0.0


def _compiled_checkpoint_world(rank, world, names):
    return {name: _vs_uncheckpointed(name, lambda m: _compiled_region(m, "nonreentrant"), rank, world)
            for name in names}


def test_compile_around_checkpoint_in_real_processes():
    # the checkpointed region's forward all-reduce runs again in the compiled backward's recomputation;
    # one norm per collective pattern (approximate backward, batch-norm op, moments without backward)
    names = ["BatchChannelNorm", "PowerNorm", "ProgressiveRepBN"]
    for per_rank in spawn(2, _compiled_checkpoint_world, 2, names, timeout=600):
        assert per_rank == dict.fromkeys(names, 0.0)


def _functional(name):
    """A training call of the functional op ``name`` on fresh state tensors: ``f(x) -> y``."""
    c = 8
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    if name == "power_norm":
        state = (torch.ones(c), torch.zeros(c), torch.zeros((), dtype=torch.long))
        return lambda x: power_norm(x, w, b, *state, training=True, warmup_iters=0)
    if name == "unified_norm":
        state = (torch.ones(c), torch.zeros(c), torch.zeros((), dtype=torch.long), torch.zeros(2, c),
                 torch.zeros(2, c), torch.zeros((), dtype=torch.long))
        return lambda x: unified_norm(x, w, b, state, training=True, window_size=2, warmup_iters=0)
    state = (torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long))
    return lambda x: batch_channel_norm(x, w, b, w, b, *state, num_groups=2, training=True, channel_dim=-1)


@pytest.mark.parametrize("name", ["batch_channel_norm", "power_norm", "unified_norm"])
def test_functional_state_ops_refuse_a_recomputation(name):
    # the functional forms advance the state tensors they are given in place and keep no snapshot:
    # a recomputation would read them advanced (eager checkpoint: input gradient off by 2.9 for
    # power_norm), so it raises, eager and compiled; a compiled call without checkpoint is fine
    x = torch.randn(4, 5, 8) * 2 + 1
    match = rf"{name}: activation checkpointing recomputes this functional call, .*Use the module .*rank 0"
    with pytest.raises(RuntimeError, match=match):
        region(nn.Identity(), "nonreentrant", call=_functional(name))(x.clone().requires_grad_()).sum().backward()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=match):
        torch.compile(region(nn.Identity(), "nonreentrant", call=_functional(name)), fullgraph=True,
                      backend="aot_eager")(x.clone().requires_grad_()).sum().backward()
    torch._dynamo.reset()
    torch.compile(_functional(name), fullgraph=True, backend="aot_eager")(x.clone().requires_grad_()).sum().backward()
