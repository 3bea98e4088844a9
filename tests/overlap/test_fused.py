"""fused_allreduce_rms_norm: both modes, worlds 1-4, uneven tokens, float64/32/bf16, vs float64."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distnorm.comm import count_collectives
from distnorm.functional.reference import rms_norm_ref
from distnorm.overlap import add_rms_norm, fused_allreduce_rms_norm, symm_mem_unavailable_reason
from distnorm.testing import assert_close_to_reference, distributed_gradcheck, simulate, spawn, split_for_world

HIDDEN, EPS = 24, 1e-6


def _inputs(tokens, world, dtype, seed=0):
    """Per-rank partial sums, residual, weight and two cotangents (for normed and residual_out)."""
    g = torch.Generator().manual_seed(seed)
    partials = torch.randn(world, tokens, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    residual = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    weight = (1 + 0.3 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)).to(dtype)
    dy = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    dres = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    return partials, residual, weight, dy, dres


def _reference(partials, residual, weight, dy, dres, dtype):
    """(normed, residual_out, d partial, d residual, d weight) computed in ``dtype`` with plain torch."""
    p = partials.to(dtype).clone().requires_grad_()
    r = residual.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    # an all-reduce in ``dtype`` rounds after every rank's addition: so does the baseline
    h = functools.reduce(torch.add, p.unbind(0)) + r
    y = rms_norm_ref(h, w, EPS) if dtype == torch.float64 else F.rms_norm(h, (HIDDEN,), w, EPS)
    (y * dy.to(dtype)).sum().add((h * dres.to(dtype)).sum()).backward()
    return y.detach(), h.detach(), p.grad[0], r.grad, w.grad


def _rank(rank, world, mode, backend, partials, residual, weight, dy, dres, normed_grad="replicated"):
    group = dist.group.WORLD if world > 1 else None
    shard = (lambda t: t) if mode == "allreduce" else (lambda t: split_for_world(t, world)[rank])
    p = partials[rank].clone().requires_grad_()
    r = shard(residual).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with count_collectives() as fwd:
        y, res_out = fused_allreduce_rms_norm(p, r, w, EPS, group=group, mode=mode, backend=backend,
                                              normed_grad=normed_grad)
    with count_collectives() as bwd:
        # "replicated": every rank's downstream hands back the full gradient of normed (``dy``);
        # "partial": its own part (``dy[rank]``), the parts summing to the full gradient
        (y * (dy[rank] if normed_grad == "partial" else dy)).sum().add((res_out * shard(dres)).sum()).backward()
    return y.detach(), res_out.detach(), p.grad, r.grad, w.grad, fwd, bwd


def _run(world, mode, tokens, dtype, backend="auto"):
    partials, residual, weight, dy, dres = _inputs(tokens, world, dtype)
    outs = simulate(world, _rank, world, mode, backend, partials, residual, weight, dy, dres, timeout=60)
    ref = _reference(partials, residual, weight, dy, dres, torch.float64)
    base = _reference(partials, residual, weight, dy, dres, dtype)
    return outs, ref, base


def _full(outs, i, mode):
    return outs[0][i] if mode == "allreduce" else torch.cat([o[i] for o in outs])


@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 7, 12, 4096])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(mode, world, tokens, dtype):
    outs, ref, base = _run(world, mode, tokens, dtype)
    y_ref, h_ref, dh_ref, _, dw_ref = ref
    kw = {"atol": 1e-10} if dtype == torch.float64 else {"baseline": None}
    for i, (name, r) in enumerate([("normed", y_ref), ("residual_out", h_ref)]):
        got = outs[0][0] if i == 0 else _full(outs, 1, mode)
        if dtype != torch.float64:
            kw = {"baseline": base[i], "atol": 1e-6}
        assert_close_to_reference(got, r, name=name, **kw)
    for rank, o in enumerate(outs):
        torch.testing.assert_close(o[0], outs[0][0], rtol=0, atol=0)  # normed is replicated, bitwise
        for j, (name, r) in enumerate([("d partial", dh_ref), ("d weight", dw_ref)]):
            if dtype != torch.float64:
                kw = {"baseline": base[2 + 2 * j], "atol": 1e-6}
            assert_close_to_reference(o[2 + 2 * j], r, name=f"{name} (rank {rank})", **kw)
    if dtype != torch.float64:
        kw = {"baseline": base[3], "atol": 1e-6}
    assert_close_to_reference(_full(outs, 3, mode), dh_ref, name="d residual", **kw)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = -(-tokens // world)  # uneven shards are padded to the largest one
    for *_, fwd, bwd in outs:
        if world == 1:
            assert fwd.counts == {} and bwd.counts == {}
        elif mode == "allreduce":
            assert fwd.counts == {"all_reduce": 1} and bwd.counts == {}
            assert fwd.bytes["all_reduce"] == tokens * HIDDEN * itemsize
        else:
            assert fwd.counts == {"reduce_scatter": 1, "all_gather": 1}
            assert fwd.bytes == {"reduce_scatter": world * rows * HIDDEN * itemsize,
                                 "all_gather": rows * HIDDEN * itemsize}
            # grad of partial: all-gather; weight grad: all-reduce of H (the norm saw 1/P of the tokens)
            assert bwd.counts == {"all_gather": 1, "all_reduce": 1}
            assert bwd.bytes["all_reduce"] == HIDDEN * max(itemsize, 4)  # summed in float32


def _partial_run(world, mode, tokens, dtype, backend="auto"):
    """normed_grad="partial": rank r hands back ``dy_parts[r]``; the loss's gradient is their sum."""
    partials, residual, weight, _, dres = _inputs(tokens, world, dtype)
    dy_parts = torch.randn(world, tokens, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy_parts = dy_parts.to(dtype)
    outs = simulate(world, _rank, world, mode, backend, partials, residual, weight, dy_parts, dres, "partial",
                    timeout=60)
    dy = functools.reduce(torch.add, dy_parts.unbind(0))  # summed in ``dtype``, as the collective does
    ref = _reference(partials, residual, weight, dy.double(), dres, torch.float64)
    base = _reference(partials, residual, weight, dy, dres, dtype)
    return outs, ref, base


@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 7, 12])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_partial_normed_grad_moves_the_forwards_bytes(mode, world, tokens, dtype):
    """normed_grad="partial": gradients of the summed loss, exact against float64, with a backward
    of the forward's collectives and bytes (reduce_scatter: 1 reduce-scatter + 1 all-gather, + the
    weight gradient's all-reduce; allreduce: 1 all-reduce)."""
    outs, ref, base = _partial_run(world, mode, tokens, dtype)

    def tol(i):  # float64: exact; else within 2x the same-dtype torch composition's error
        return {"atol": 1e-10} if dtype == torch.float64 else {"baseline": base[i], "atol": 1e-6}

    for rank, o in enumerate(outs):
        assert_close_to_reference(o[2], ref[2], name=f"d partial (rank {rank})", **tol(2))
        assert_close_to_reference(o[4], ref[4], name=f"d weight (rank {rank})", **tol(4))
    assert_close_to_reference(_full(outs, 3, mode), ref[3], name="d residual", **tol(3))
    for *_, fwd, bwd in outs:
        if world == 1:
            assert fwd.counts == bwd.counts == {}
        elif mode == "allreduce":
            assert bwd.counts == fwd.counts == {"all_reduce": 1} and bwd.bytes == fwd.bytes
        else:
            assert bwd.counts == {"reduce_scatter": 1, "all_gather": 1, "all_reduce": 1}
            assert {k: bwd.bytes[k] for k in fwd.bytes} == fwd.bytes
            # the weight gradient, in float32 (float64 for float64)
            assert bwd.bytes["all_reduce"] == HIDDEN * max(torch.empty((), dtype=dtype).element_size(), 4)


@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_torch_backend_agrees_with_fused(mode):
    a, *_ = _run(3, mode, 7, torch.float64, backend="auto")
    b, *_ = _run(3, mode, 7, torch.float64, backend="torch")
    for oa, ob in zip(a, b, strict=True):
        for ta, tb in zip(oa[:5], ob[:5], strict=True):
            torch.testing.assert_close(ta, tb, rtol=0, atol=1e-12)
        assert oa[5].counts == ob[5].counts and oa[6].counts == ob[6].counts


def _gradcheck_rank(rank, world, mode, normed_grad, partials, residual, weight):
    group = dist.group.WORLD
    res = residual if mode == "allreduce" else split_for_world(residual, world)[rank]
    kw = dict(group=group, mode=mode, normed_grad=normed_grad)

    def of_partial(p):
        return fused_allreduce_rms_norm(p, res, weight, EPS, **kw)[0]

    def of_weight(w):
        return fused_allreduce_rms_norm(partials[rank], res, w, EPS, **kw)[0]

    def of_residual(r):
        return fused_allreduce_rms_norm(partials[rank], r, weight, EPS, **kw)[0]

    # "replicated": one loss on the replicated normed; "partial": every rank adds its own term
    # sum_r <c_r, normed> and hands back c_r (distributed_gradcheck's sharded-output loss)
    replicated = normed_grad == "replicated"
    distributed_gradcheck(of_partial, partials[rank], group, replicated_output=replicated)
    distributed_gradcheck(of_weight, weight, group, replicated_input=True, replicated_output=replicated)
    distributed_gradcheck(of_residual, res, group, replicated_input=mode == "allreduce", replicated_output=replicated)
    return True


@pytest.mark.parametrize("normed_grad", ["replicated", "partial"])
@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_gradients_of_the_global_loss(mode, normed_grad):
    """Finite differences of the global loss agree with the stated gradient semantics."""
    partials, residual, weight, *_ = _inputs(5, 3, torch.float64)
    partials, residual, weight = partials[:, :, :4].contiguous(), residual[:, :4].contiguous(), weight[:4].contiguous()
    assert all(simulate(3, _gradcheck_rank, 3, mode, normed_grad, partials, residual, weight, timeout=120))


def _spawn_rank(rank, partials, residual, weight, dy, dres):
    torch.set_num_threads(1)
    outs = {}
    for mode in ("allreduce", "reduce_scatter"):
        for normed_grad in ("replicated", "partial"):
            # "partial": rank 0 hands back all of dy, rank 1 nothing -- still their sum
            g = torch.stack([dy, torch.zeros_like(dy)]) if normed_grad == "partial" else dy
            out = _rank(rank, 2, mode, "gloo", partials, residual, weight, g, dres, normed_grad)
            outs[mode, normed_grad] = (*out[:5], out[5].counts, out[6].counts)
    return outs


def test_real_gloo_processes():
    partials, residual, weight, dy, dres = _inputs(7, 2, torch.float32)
    results = spawn(2, _spawn_rank, partials, residual, weight, dy, dres, timeout=120)
    ref = _reference(partials, residual, weight, dy, dres, torch.float64)
    base = _reference(partials, residual, weight, dy, dres, torch.float32)
    for mode in ("allreduce", "reduce_scatter"):
        for normed_grad in ("replicated", "partial"):
            outs = [r[mode, normed_grad] for r in results]
            assert_close_to_reference(outs[0][0], ref[0], baseline=base[0], atol=1e-6)
            assert_close_to_reference(_full(outs, 1, mode), ref[1], baseline=base[1], atol=1e-6)
            assert_close_to_reference(outs[1][2], ref[2], baseline=base[2], atol=1e-6)
            assert_close_to_reference(_full(outs, 3, mode), ref[3], baseline=base[3], atol=1e-6)
            assert_close_to_reference(outs[1][4], ref[4], baseline=base[4], atol=1e-6)
            expected = {"all_reduce": 1} if mode == "allreduce" else {"reduce_scatter": 1, "all_gather": 1}
            assert outs[0][5] == expected
            if normed_grad == "partial":  # the forward's collectives (+ the weight's all-reduce)
                assert {k: outs[0][6][k] for k in expected} == expected


def test_local_add_rms_norm_matches_reference():
    x, r, w = torch.randn(5, HIDDEN, dtype=torch.float64), torch.randn(5, HIDDEN, dtype=torch.float64), torch.randn(HIDDEN)
    y, h = add_rms_norm(x, r, w.double(), EPS)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, rms_norm_ref(x + r, w, EPS), rtol=0, atol=1e-12)
    y16, h16 = add_rms_norm(x.bfloat16(), r.bfloat16(), None, EPS)
    assert y16.dtype == h16.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_shapes_dtypes_modes_local():
    p, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 8\) \(allreduce mode.*got \(3, 8\) \(rank 0 of 1\)"):
        fused_allreduce_rms_norm(p, r[:3], w, group=None)
    with pytest.raises(TypeError, match=r"residual dtype must equal partial's torch.float32, got torch.float64 \(rank 0"):
        fused_allreduce_rms_norm(p, r.double(), w, group=None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\) \(rank 0 of 1\)"):
        fused_allreduce_rms_norm(p, r, w[:7], group=None)
    with pytest.raises(ValueError, match=r"partial must be a 2-D \[tokens, hidden\] tensor, got \(2, 2, 8\)"):
        fused_allreduce_rms_norm(p.view(2, 2, 8), r, w, group=None)
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'scatter' \(rank 0 of 1\)"):
        fused_allreduce_rms_norm(p, r, w, group=None, mode="scatter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"eps must be a float >= 0, got -1.0"):
        fused_allreduce_rms_norm(p, r, w, -1.0, group=None)
    with pytest.raises(ValueError, match=r"normed_grad must be one of \('replicated', 'partial'\), got 'sum' "
                                         r"\(rank 0 of 1\)"):
        fused_allreduce_rms_norm(p, r, w, group=None, normed_grad="sum")  # type: ignore[arg-type]


def test_symm_mem_on_cpu_says_why():
    p, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match=r"backend='symm_mem' is unavailable: tensors are on 'cpu', "
                                           r"symmetric memory needs CUDA tensors \(rank 0 of 1\)"):
        fused_allreduce_rms_norm(p, r, w, group=None, backend="symm_mem")
    assert "CUDA" in symm_mem_unavailable_reason(None, torch.device("cpu"))


def _bad_rank(rank, case):
    group = dist.group.WORLD
    p, w = torch.randn(7, 8), torch.ones(8)
    if case == "full residual in reduce_scatter mode":  # only rank 1 gets it wrong
        residual = torch.randn(7 if rank == 1 else [3, 2, 2][rank], 8)
        fused_allreduce_rms_norm(p, residual, w, group=group, mode="reduce_scatter")
    elif case == "nccl on a threaded group":
        fused_allreduce_rms_norm(p, torch.randn(7, 8), w, group=group, backend="nccl")


def test_bad_inputs_name_the_rank():
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 8\) \(reduce_scatter mode: the residual is "
                                         r"this rank's token shard, shard_sizes\(7, 3\)\), got \(7, 8\) \(rank 1 of 3\)"):
        simulate(3, _bad_rank, "full residual in reduce_scatter mode", timeout=60)
    with pytest.raises(ValueError, match=r"backend='nccl' does not match the group's backend 'threaded'"):
        simulate(2, _bad_rank, "nccl on a threaded group", timeout=60)
