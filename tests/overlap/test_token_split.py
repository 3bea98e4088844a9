"""TokenWeaver: woven == the plain stack of fused ops (outputs and every gradient), worlds 1-4,
both modes, both gradient conventions; the forward and backward schedules; errors."""

import functools
import math
import re

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import PendingCollective, count_collectives, shard_offsets, shard_sizes
from distnorm.overlap import ParallelMLPBlock, TokenSplitPlan, TokenWeaver, plan_token_split, token_split
from distnorm.testing import max_abs_error, simulate, spawn
from tests.compose.harness import CHECKPOINT_MODES, checkpointed

HIDDEN, FFN, LAYERS = 16, 24, 2


def _blocks(group, dtype, normed_grad="replicated"):
    """LAYERS blocks, built in float64 from one seed on every rank, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(11)
    blocks = [ParallelMLPBlock(HIDDEN, FFN, group=group, generator=gen, dtype=torch.float64, normed_grad=normed_grad)
              for _ in range(LAYERS)]
    for b in blocks:
        with torch.no_grad():
            b.norm_weight.copy_(1 + 0.3 * torch.randn(HIDDEN, generator=gen, dtype=torch.float64))
    return [b.to(dtype) for b in blocks]


def _local(t, mode, group):
    """What this rank holds of a residual-like tensor: every token (allreduce) or its shard."""
    if mode == "allreduce" or group is None:
        return t
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return t.narrow(0, shard_offsets(t.shape[0], world)[rank], shard_sizes(t.shape[0], world)[rank])


def _step(blocks, group, plan, mode, normed_grad, x, residual, dy, dres, *, weaver=True, checkpoint=None):
    """Forward + backward of the stack -- through TokenWeaver (inside ``torch.utils.checkpoint`` in
    mode ``checkpoint`` when given), or (``weaver=False``) the blocks called one after another --
    returning outputs, every gradient, and fwd/bwd collective counts.

    The loss is computed identically on every rank; with ``normed_grad="partial"`` each rank hands
    back 1/P of its gradient (their sum is the loss's), with ``"replicated"`` all of it."""
    for b in blocks:
        b.zero_grad(set_to_none=True)
    world = dist.get_world_size(group) if group is not None else 1
    dtype = blocks[0].norm_weight.dtype
    x = x.to(dtype).clone().requires_grad_()
    residual = _local(residual, mode, group).to(dtype).clone().requires_grad_()
    dy = dy.to(dtype) / (world if normed_grad == "partial" else 1)
    with count_collectives() as fwd:
        if weaver:
            woven = TokenWeaver(blocks, group, plan, mode=mode, normed_grad=normed_grad)
            y, res_out = (woven if checkpoint is None else checkpointed(woven, checkpoint))(x, residual)
        else:
            y, res_out = x, residual
            for b in blocks:
                y, res_out = b(y, res_out, mode=mode)
    with count_collectives() as bwd:
        torch.autograd.backward((y, res_out), (dy, _local(dres, mode, group).to(dtype)))
    tensors = [y.detach(), res_out.detach(), x.grad, residual.grad]
    # the row-parallel bias is added on TP rank 0 only: elsewhere its gradient is None
    tensors += [torch.zeros_like(p) if p.grad is None else p.grad for b in blocks for p in b.parameters()]
    return tensors, fwd.counts, bwd.counts


def _inputs(tokens):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64) for _ in range(4)]


def _scale(t):
    return max(float(t.abs().max()), 1.0) if t.numel() else 1.0


NAMES = ["normed", "residual_out", "d x", "d residual"] + [f"d param {i}" for i in range(5 * LAYERS)]


def _compare_rank(rank, world, mode, normed_grad, plan, x, residual, dy, dres):
    group = dist.group.WORLD if world > 1 else None
    blocks = _blocks(group, torch.float64, normed_grad)
    out = {}
    for name, p, weaver in (("stack", None, False), ("unsplit", None, True), ("woven", plan, True)):
        out[name] = _step(blocks, group, p, mode, normed_grad, x, residual, dy, dres, weaver=weaver)
    with torch.no_grad():  # the forward without recording (inference) gives the same outputs
        y, r = TokenWeaver(blocks, group, plan, mode=mode, normed_grad=normed_grad)(
            x, _local(residual, mode, group))
    out["no_grad"] = [y, r]
    return out


@pytest.mark.parametrize("normed_grad", ["replicated", "partial"])
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("chunks", [(3, 4), (5, 7), (1,), (4, 3, 5)], ids=str)
def test_woven_equals_the_plain_stack(mode, normed_grad, world, chunks):
    """float64: the woven run (forward and backward) equals the blocks called one after another to
    round-off, on every rank, with the collectives pinned; uneven tokens (1, 7, 12), two halves or
    three chunks."""
    tokens = sum(chunks)
    plan = TokenSplitPlan(num_tokens=tokens, first=chunks[0], chunks=chunks if len(chunks) > 2 else ())
    outs = simulate(world, _compare_rank, world, mode, normed_grad, plan, *_inputs(tokens), timeout=120)
    halves = len(chunks)
    for rank, out in enumerate(outs):
        stack, _, _ = out["stack"]
        for variant in ("unsplit", "woven"):
            tensors = out[variant][0]
            for name, s, t in zip(NAMES, stack, tensors, strict=True):
                err, scale = max_abs_error(t, s), _scale(s)
                assert err <= 1e-12 * scale, f"{variant} {name} rank {rank}: {err:.3e}"
        for i, name in enumerate(NAMES[:2]):
            torch.testing.assert_close(out["no_grad"][i], stack[i], rtol=0, atol=1e-12, msg=name)
        # collectives: the unsplit weaver issues the stack's; the woven run those of each half
        assert out["unsplit"][1:] == out["stack"][1:]
        for halves_, (_, fwd, bwd) in ((1, out["stack"]), (halves, out["woven"])):
            if world == 1:
                assert fwd == bwd == {}
            else:
                assert (fwd, bwd) == _expected_counts(mode, normed_grad, halves_)


def _expected_counts(mode, normed_grad, halves):
    """Per step (P > 1): forward, the fused op's per block and half; backward, the blocks' own (the
    row linear's bias all-reduce, and with "replicated" the column linear's all-reduce of x's
    gradient) per block and half, the fused op's (its forward's kinds with "partial", an all-gather
    in reduce_scatter mode with "replicated") per block and half, and in reduce_scatter mode one
    all-reduce of the norm weight's gradient per block, both halves at once."""
    n = LAYERS * halves
    op = {"all_reduce": n} if mode == "allreduce" else {"reduce_scatter": n, "all_gather": n}
    bwd = {"all_reduce": n * (2 if normed_grad == "replicated" else 1)}
    if normed_grad == "partial":
        bwd = {k: bwd.get(k, 0) + op.get(k, 0) for k in {**bwd, **op}}
    elif mode == "reduce_scatter":
        bwd["all_gather"] = n
    if mode == "reduce_scatter":
        bwd["all_reduce"] += LAYERS
    return op, bwd


def _precision_rank(rank, world, mode, normed_grad, dtype, plan, *inputs):
    group = dist.group.WORLD
    ref = _step(_blocks(group, torch.float64, normed_grad), group, None, mode, normed_grad, *inputs, weaver=False)[0]
    blocks = _blocks(group, dtype, normed_grad)
    stack = _step(blocks, group, None, mode, normed_grad, *inputs, weaver=False)[0]
    woven = _step(blocks, group, plan, mode, normed_grad, *inputs)[0]
    return ref, stack, woven


@pytest.mark.parametrize("normed_grad", ["replicated", "partial"])
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_within_twice_the_stacks_error(mode, normed_grad, dtype):
    """float32/bf16 vs float64: the woven run's error is at most twice the plain stack's (plus, in
    bf16, one rounding of a parameter gradient that both halves feed)."""
    plan = TokenSplitPlan(num_tokens=12, first=5)
    for rank, (ref, stack, woven) in enumerate(simulate(3, _precision_rank, 3, mode, normed_grad, dtype, plan,
                                                        *_inputs(12), timeout=120)):
        for name, r, s, w in zip(NAMES, ref, stack, woven, strict=True):
            scale = float(r.abs().max()) if r.numel() else 0.0
            bound = 2 * max_abs_error(s, r) + 1e-6 * scale
            if dtype == torch.bfloat16 and name.startswith("d param") and scale > 0:
                # the block parameters' gradients of the two halves are summed in float32 and
                # rounded once; the plain stack's single bf16 rounding may land the other way
                bound += 2.0 ** (math.floor(math.log2(scale)) - 7)
            assert max_abs_error(w, r) <= bound, f"{name} rank {rank}: {max_abs_error(w, r):.3e} > {bound:.3e}"


def _fallback_rank(rank, mode, normed_grad, plan, *inputs):
    group = dist.group.WORLD
    return _step(_blocks(group, torch.float64, normed_grad), group, plan, mode, normed_grad, *inputs)


@pytest.mark.parametrize("normed_grad", ["replicated", "partial"])
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_unwoven_path_is_the_autograd_of_the_forward(monkeypatch, mode, normed_grad):
    """Where the weaver cannot weave (torch.compile, saved-tensor hooks: ``can_weave()`` False) it
    records nothing and autograd differentiates the forward graph (blocking collectives): the same
    gradients as the woven backward, from the same collectives. (The compiled run itself is
    tests/compose/test_compile.py's TokenWeaver case.)"""
    plan = TokenSplitPlan(num_tokens=12, first=5)
    woven = simulate(3, _fallback_rank, mode, normed_grad, plan, *_inputs(12), timeout=120)
    monkeypatch.setattr(token_split, "can_weave", lambda: False)
    monkeypatch.setattr(token_split, "woven", None)  # not called: nothing is recorded
    plain = simulate(3, _fallback_rank, mode, normed_grad, plan, *_inputs(12), timeout=120)
    for (w, w_fwd, w_bwd), (p, p_fwd, p_bwd) in zip(woven, plain, strict=True):
        assert (w_fwd, w_bwd) == (p_fwd, p_bwd)
        for name, a, b in zip(NAMES, w, p, strict=True):
            assert max_abs_error(a, b) <= 1e-12 * _scale(b), name


def _checkpoint_rank(rank, mode, normed_grad, plan, *inputs):
    group = dist.group.WORLD
    blocks = _blocks(group, torch.float64, normed_grad)
    return {ckpt: _step(blocks, group, plan, mode, normed_grad, *inputs, checkpoint=ckpt)
            for ckpt in (None, *CHECKPOINT_MODES)}


@pytest.mark.parametrize(("mode", "normed_grad"), [("allreduce", "replicated"), ("reduce_scatter", "partial")])
def test_activation_checkpointing_gives_the_woven_gradients_recomputing_once(mode, normed_grad):
    """Non-reentrant, reentrant and selective checkpointing around the weaver: the uncheckpointed
    run's outputs and gradients, and the backward issues the uncheckpointed backward's collectives
    plus the forward's at most once: one recompute of the region (reentrant: all of it;
    non-reentrant stops once the last saved tensor is back, before the final all-gather). Recording
    pieces under the checkpoint's hooks would recompute the stack once per piece, and fail under
    selective checkpointing ("Trying to backward an extra time")."""
    plan = TokenSplitPlan(num_tokens=12, first=5)
    for rank, out in enumerate(simulate(3, _checkpoint_rank, mode, normed_grad, plan, *_inputs(12), timeout=120)):
        want, fwd, bwd = out[None]
        for ckpt in CHECKPOINT_MODES:
            got, got_fwd, got_bwd = out[ckpt]
            for name, g, w in zip(NAMES, got, want, strict=True):
                assert max_abs_error(g, w) <= 1e-12 * _scale(w), f"{ckpt} checkpointing, {name}, rank {rank}"
            recomputed = {k: n for k in {**got_bwd, **bwd} if (n := got_bwd.get(k, 0) - bwd.get(k, 0))}
            assert got_fwd == fwd, f"{ckpt} checkpointing, rank {rank}"
            if ckpt == "reentrant":
                assert recomputed == fwd, f"{ckpt} checkpointing, rank {rank}: {got_bwd} vs {bwd} + {fwd}"
            else:
                assert all(fwd.get(k, 0) - 1 <= recomputed.get(k, 0) <= fwd.get(k, 0) for k in {**fwd, **recomputed}), (
                    f"{ckpt} checkpointing, rank {rank}: backward collectives {got_bwd}, uncheckpointed {bwd}, "
                    f"forward {fwd}")


# --------------------------------------------------------------------------------------------
# The schedules
# --------------------------------------------------------------------------------------------


CHUNK_NAMES = {3: "A", 4: "B", 2: "C"}  # chunks told apart by their token counts


class _RecordingLauncher:
    """A world of one whose collectives log when they are issued and waited for."""

    world = 1

    def __init__(self, log):
        self.log = log

    def _issue(self, x):
        name = CHUNK_NAMES[x.shape[0]]
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


class _Probe(torch.autograd.Function):
    """Identity that logs "compute' <half>" when the gradient of a block's input is computed."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log, ctx.name = log, CHUNK_NAMES[x.shape[0]]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(f"compute' {ctx.name}")
        return grad, None


def _logged_run(monkeypatch, mode, normed_grad, chunks=(3, 4)):
    log = []
    monkeypatch.setattr(token_split, "make_launcher", lambda *a, **k: _RecordingLauncher(log))
    blocks = _blocks(None, torch.float64, normed_grad)
    for b in blocks:
        original = b.partial

        def partial(x, original=original):
            log.append(f"compute {CHUNK_NAMES[x.shape[0]]}")
            return original(_Probe.apply(x, log))

        b.partial = partial
    x, residual, *_ = _inputs(sum(chunks))
    plan = TokenSplitPlan(num_tokens=sum(chunks), first=chunks[0], chunks=chunks if len(chunks) > 2 else ())
    y, r = TokenWeaver(blocks, None, plan, mode=mode, normed_grad=normed_grad)(x.requires_grad_(), residual)
    forward = list(log)
    log.clear()
    (y.sum() + r.sum()).backward()
    return forward, log


def test_forward_schedule_overlaps_each_half_with_the_others_compute(monkeypatch):
    forward, _ = _logged_run(monkeypatch, "allreduce", "replicated")
    assert forward == [
        "compute A", "issue A", "compute B", "issue B", "wait A",   # block 0: B computes while A communicates
        "compute A", "issue A", "wait B", "compute B", "issue B", "wait A",  # block 1: A1 overlaps B0's comm
        "wait B",
    ]
    forward, _ = _logged_run(monkeypatch, "reduce_scatter", "replicated")
    assert forward == [  # rs = reduce-scatter, ag = all-gather; the norm runs between a half's two
        "compute A", "issue A",                                   # A0 rs
        "compute B", "issue B",                                   # B0 (A0's rs in flight), B0 rs
        "wait A", "issue A", "wait B", "issue B",                 # norm A0, A0 ag; norm B0, B0 ag
        "wait A", "compute A", "issue A",                         # A1 (B0's ag in flight), A1 rs
        "wait B", "compute B", "issue B",                         # B1 (A1's rs in flight)
        "wait A", "issue A", "wait B", "issue B", "wait A", "wait B",
    ]


def test_three_chunks_hide_both_reduce_scatter_collectives(monkeypatch):
    """Staggered turns: between a chunk's reduce-scatter and its norm, and between its all-gather
    and its next compute, another chunk computes."""
    forward, _ = _logged_run(monkeypatch, "reduce_scatter", "replicated", chunks=(3, 4, 2))
    assert forward == [
        "compute A", "issue A",                                  # turn 0: A0
        "compute B", "issue B", "wait A", "issue A",             # turn 1: B0 (A's rs in flight), norm A0
        "compute C", "issue C", "wait B", "issue B",             # turn 2: C0 (A's ag in flight), norm B0
        "wait A", "compute A", "issue A",                        # turn 2: A1
        "wait C", "issue C", "wait B", "compute B", "issue B",   # turn 3: norm C0 (A1 hid B's ag), B1
        "wait A", "issue A",                                     # turn 3: norm A1 (B1 hid A's rs)
        "wait C", "compute C", "issue C", "wait B", "issue B", "wait A",   # turn 4: C1, norm B1
        "wait C", "issue C", "wait B",                           # turn 5: norm C1
        "wait C",
    ]
    _, backward = _logged_run(monkeypatch, "reduce_scatter", "partial", chunks=(3, 4, 2))
    computes = [e for e in backward if e.startswith("compute'")]
    assert computes == ["compute' A", "compute' B", "compute' C"] * LAYERS


def test_backward_schedule_overlaps_each_half_with_the_others_compute(monkeypatch):
    """The backward's collectives are issued asynchronously: each is in flight while the other
    half's backward compute (compute') runs, block by block, as in the forward."""
    _, backward = _logged_run(monkeypatch, "allreduce", "partial")
    assert backward == [  # the all-reduce of each half's partial gradient of normed
        "issue A", "issue B",
        "wait A", "compute' A", "issue A",   # A's block 1 backward while B's all-reduce is in flight
        "wait B", "compute' B", "issue B",   # B's while A's (of block 0's output) is
        "wait A", "compute' A",
        "wait B", "compute' B",
    ]
    _, backward = _logged_run(monkeypatch, "reduce_scatter", "partial")
    assert backward == [  # rs of the normed gradient, norm backward, ag of d partial, compute'
        "issue A", "issue B",
        "wait A", "issue A", "wait B", "issue B",                 # norm' A1, ag; norm' B1, ag
        "wait A", "compute' A", "issue A",                        # A1' while B's ag is in flight, rs
        "wait B", "compute' B", "issue B",                        # B1' while A's rs is in flight
        "wait A", "issue A", "wait B", "issue B",
        "wait A", "compute' A", "wait B", "compute' B",
    ]
    _, backward = _logged_run(monkeypatch, "reduce_scatter", "replicated")
    assert backward == [  # the gradient arrives whole: norm', ag of d partial, compute'
        "issue A", "issue B",
        "wait A", "compute' A", "issue A", "wait B", "compute' B", "issue B",
        "wait A", "compute' A", "wait B", "compute' B",
    ]


# --------------------------------------------------------------------------------------------
# Plans, residual layout, errors
# --------------------------------------------------------------------------------------------


def test_callable_plan_and_plan_mismatch():
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(12)
    planner = functools.partial(plan_token_split, hidden=HIDDEN, world=1)
    y, _ = TokenWeaver(blocks, None, planner)(x, residual)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match=r"plan is for num_tokens=7, got an input of 12 tokens .*\(rank 0\)"):
        TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3))(x, residual)


def _sharded_residual_rank(rank):
    """reduce_scatter mode: the residual is this rank's token shard, in and out, as the fused op
    holds it; a full residual is refused naming the shard's shape."""
    group = dist.group.WORLD
    blocks = _blocks(group, torch.float64)
    x, residual, *_ = _inputs(7)
    shard = _local(residual, "reduce_scatter", group)
    y, r = TokenWeaver(blocks, group, TokenSplitPlan(num_tokens=7, first=3), mode="reduce_scatter")(x, shard)
    assert y.shape == x.shape and r.shape == shard.shape == (shard_sizes(7, 3)[rank], HIDDEN)
    with pytest.raises(ValueError, match=rf"residual must have shape \({shard.shape[0]}, 16\) \(reduce_scatter mode: "
                                         r"this rank's token shard, shard_sizes\(7, 3\)\), got \(7, 16\) "
                                         rf"\(rank {rank} of 3\)"):
        TokenWeaver(blocks, group, mode="reduce_scatter")(x, residual)
    return True


def test_reduce_scatter_residual_is_token_sharded():
    assert all(simulate(3, _sharded_residual_rank, timeout=60))


def test_bad_weaver_arguments():
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(7)
    with pytest.raises(ValueError, match=r"residual must have shape \(7, 16\) \(allreduce mode: every token, like x\), "
                                         r"got \(6, 16\) \(rank 0 of 1\)"):
        TokenWeaver(blocks, None)(x, residual[:6])
    with pytest.raises(ValueError, match=r"x must be \[tokens, hidden\] .*got \(7, 16, 1\)"):
        TokenWeaver(blocks, None)(x[..., None], residual)
    with pytest.raises(TypeError, match=r"residual dtype must equal x's torch.float64, got torch.float32"):
        TokenWeaver(blocks, None)(x, residual.float())
    with pytest.raises(TypeError, match=r"blocks\[0\] \(Linear\) must have partial\(x\) and norm_weight"):
        TokenWeaver([torch.nn.Linear(2, 2)], None)
    with pytest.raises(ValueError, match=r"blocks must be a non-empty sequence, got 0 blocks \(rank 0 of 1\)"):
        TokenWeaver([], None)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'mpi' \(rank 0 of 1\)"):
        TokenWeaver(blocks, None, backend="mpi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"normed_grad must be one of \('replicated', 'partial'\), got 'sum'"):
        TokenWeaver(blocks, None, normed_grad="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"blocks\[0\].normed_grad is 'replicated' but normed_grad='partial'.* "
                                         r"reduced twice or not at all \(rank 0 of 1\)"):
        TokenWeaver(blocks, None, normed_grad="partial")
    with pytest.raises(ValueError, match=r"ParallelMLPBlock: normed_grad must be one of .* got 'sum'"):
        ParallelMLPBlock(4, 8, normed_grad="sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(1,), (), (HIDDEN + 1,), (1, HIDDEN)], ids=str)
def test_wrong_shape_norm_weight_is_refused_naming_the_block(shape):
    """A block's norm weight of another shape -- assigned, or through functional_call, with or without
    grad -- is a ValueError naming it; a [1] or 0-d one would otherwise broadcast silently."""
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(7)
    weaver = TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3))
    bad = torch.full(shape, 1.5, dtype=torch.float64)
    msg = rf"TokenWeaver: blocks\[1\].norm_weight must have shape \(16,\), got {re.escape(str(shape))} \(rank 0 of 1\)"
    with pytest.raises(ValueError, match=msg):
        torch.func.functional_call(weaver, {"blocks.1.norm_weight": bad}, (x.requires_grad_(), residual))
    blocks[1].norm_weight = torch.nn.Parameter(bad)
    with torch.no_grad(), pytest.raises(ValueError, match=msg):
        weaver(x, residual)
    with pytest.raises(TypeError, match=r"blocks\[1\].norm_weight must be floating point, got torch.int64"):
        torch.func.functional_call(weaver, {"blocks.1.norm_weight": torch.ones(HIDDEN, dtype=torch.long)},
                                   (x, residual))


def test_second_backward_through_the_woven_stack_is_refused():
    blocks = _blocks(None, torch.float64)
    x, residual, *_ = _inputs(7)
    y, _ = TokenWeaver(blocks, None, TokenSplitPlan(num_tokens=7, first=3))(x.requires_grad_(), residual)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"the woven backward runs once per forward"):
        y.sum().backward()


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
    result = {}
    for mode in ("allreduce", "reduce_scatter"):
        for normed_grad in ("replicated", "partial"):
            blocks = _blocks(group, torch.float64, normed_grad)
            args = (mode, normed_grad, x, residual, dy, dres)
            stack, _, _ = _step(blocks, group, None, *args, weaver=False)
            woven, fwd, bwd = _step(blocks, group, TokenSplitPlan(num_tokens=12, first=6), *args)
            result[mode, normed_grad] = max(max_abs_error(w, s) for w, s in zip(woven, stack, strict=True)), fwd, bwd
    return result


def test_real_gloo_processes():
    for result in spawn(2, _spawn_rank, timeout=120):
        for (mode, normed_grad), (err, fwd, bwd) in result.items():
            assert err <= 1e-12, (mode, normed_grad, err)
            assert (fwd, bwd) == _expected_counts(mode, normed_grad, 2)
