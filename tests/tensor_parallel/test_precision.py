"""The precision contract (docs/precision.md) with bf16 and fp16 parameters, worlds 1-4, all three forms.

Parameter gradients are accumulated in float32 and cast to the parameter dtype once, after any
cross-rank sum. The inputs are built so that breaking this shows: the output gradient flips sign
between token blocks, so every partial sum of ``dy * x_hat`` (one rank's tokens, or half of the
tokens) is ``A`` times larger than the total. A partial rounded to 16 bits before it is summed
carries an error of ``A * 2^-9`` (bf16) — far above one rounding of the float32 total.
"""

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import shard_sizes
from distnorm.functional.reference import layer_norm_ref, rms_norm_ref
from distnorm.tensor_parallel import (
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
    SingleScaleRMSNorm,
    sync_sequence_parallel_grads,
)
from distnorm.testing import simulate, split_for_world

HIDDEN = 24  # over 3 ranks: 8 columns each; over 4: 6
A = 32.0  # size of one block's dw contribution relative to the total


def _problem(world: int, dtype: torch.dtype, sequence: bool):
    """x (nearly the same row for every token), dy whose sign flips per token block: partials cancel."""
    g = torch.Generator().manual_seed(world)
    tokens_per_block = 4
    blocks = 2 * world if sequence else 4  # sequence parallel: 2 blocks per rank, of opposite sign
    t = tokens_per_block * blocks
    x = (1.5 + torch.randn(HIDDEN, generator=g, dtype=torch.float64)).expand(t, HIDDEN).clone()
    x += 0.05 * torch.randn(t, HIDDEN, generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(blocks // 2).repeat_interleave(tokens_per_block)
    if sequence:  # rank r holds blocks 2r (+) and 2r+1 (-): its partial is small too unless whole ranks flip
        sign = torch.tensor([1.0 if r % 2 == 0 else -1.0 for r in range(world) for _ in range(2 * tokens_per_block)],
                            dtype=torch.float64)
    dy = A * sign[:, None] * (1 + 0.01 * torch.randn(t, HIDDEN, generator=g, dtype=torch.float64))
    weight = 1 + 0.1 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype), weight.to(dtype), bias.to(dtype)


def _reference_grads(kind: str, x, dy, weight, bias):
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    if kind == "layer":
        y = layer_norm_ref(leaves[0], leaves[1], leaves[2], 1e-5)
    elif kind == "rms":
        y = rms_norm_ref(leaves[0], leaves[1], 1e-6)
    else:  # single: one gain
        y = rms_norm_ref(leaves[0], None, 1e-6) * leaves[1][:1]
    y.backward(dy.double())
    return {"weight": leaves[1].grad if kind != "single" else leaves[1].grad[:1], "bias": leaves[2].grad}


def _assert_rounded_once(name, grad, ref, dtype):
    """``grad`` is the float64 reference rounded once to ``dtype`` (1 ulp of slack for float32 accumulation)."""
    assert grad.dtype == dtype, (name, grad.dtype)
    ulp = torch.finfo(dtype).eps * ref.abs() + 1e-4 * A  # per element: one rounding + float32 summation error
    err = (grad.double() - ref).abs()
    assert bool((err <= ulp).all()), f"{name}: max error {float(err.max()):.3e} > one {dtype} rounding"


MODULES = {
    "SequenceParallelLayerNorm": ("layer", "sequence", lambda g, dt: SequenceParallelLayerNorm(HIDDEN, group=g, dtype=dt)),
    "SequenceParallelRMSNorm": ("rms", "sequence", lambda g, dt: SequenceParallelRMSNorm(HIDDEN, group=g, dtype=dt)),
    "SingleScaleRMSNorm[sequence]": ("single", "sequence", lambda g, dt: SingleScaleRMSNorm(HIDDEN, group=g, dtype=dt)),
    "ShardedLayerNorm": ("layer", "sharded", lambda g, dt: ShardedLayerNorm(HIDDEN, group=g, dtype=dt)),
    "ShardedRMSNorm": ("rms", "sharded", lambda g, dt: ShardedRMSNorm(HIDDEN, group=g, dtype=dt)),
    "SingleScaleRMSNorm[sharded]": ("single", "sharded",
                                    lambda g, dt: SingleScaleRMSNorm(HIDDEN, parallel="sharded", group=g, dtype=dt)),
}


def _rank(rank, world, dtype):
    group = dist.group.WORLD if world > 1 else None
    out = {}
    for name, (kind, form, build) in MODULES.items():
        x, dy, weight, bias = _problem(world, dtype, form == "sequence")
        mod = build(group, dtype)
        dim = 0 if form == "sequence" else -1
        with torch.no_grad():
            if kind == "single":
                mod.weight.copy_(weight[:1])
            else:
                mod.weight.copy_(weight if form == "sequence" else split_for_world(weight, world, dim=0)[rank])
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(bias if form == "sequence" else split_for_world(bias, world, dim=0)[rank])
        xs = split_for_world(x, world, dim)[rank].requires_grad_()
        y = mod(xs)
        y.backward(split_for_world(dy, world, dim)[rank])
        out[name] = (y.dtype, xs.grad.dtype, {n: p.grad for n, p in mod.named_parameters()})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parameter_grads_are_rounded_once_after_the_cross_rank_sum(world, dtype):
    outs = simulate(world, _rank, world, dtype, timeout=120)
    for name, (kind, form, _) in MODULES.items():
        x, dy, weight, bias = _problem(world, dtype, form == "sequence")
        ref = _reference_grads(kind, x, dy, weight, bias)
        for rank, per_rank in enumerate(outs):
            y_dtype, dx_dtype, grads = per_rank[name]
            assert y_dtype == dtype and dx_dtype == dtype, name  # outputs in the input dtype
            for pname, grad in grads.items():
                expected = ref[pname]
                if form == "sharded" and kind != "single":  # this rank's columns
                    expected = split_for_world(expected, world, dim=0)[rank]
                _assert_rounded_once(f"{name}.{pname} rank {rank}/{world}", grad, expected, dtype)


def _deferred_rank(rank, world, kind):
    """fp32 master parameters, bf16 activations, grad_sync="deferred": dW stays fp32 through the sync."""
    group = dist.group.WORLD if world > 1 else None
    x, dy, weight, bias = _problem(world, torch.bfloat16, True)
    cls = SequenceParallelLayerNorm if kind == "layer" else SequenceParallelRMSNorm
    mod = cls(HIDDEN, group=group, grad_sync="deferred")  # float32 parameters
    with torch.no_grad():
        mod.weight.copy_(weight.float())
        if mod.bias is not None:
            mod.bias.copy_(bias.float())
    xs = split_for_world(x, world)[rank].requires_grad_()
    y = mod(xs)
    y.backward(split_for_world(dy, world)[rank])
    sync_sequence_parallel_grads(mod)
    return y.dtype, {n: p.grad for n, p in mod.named_parameters()}


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("world", [2, 3])
def test_deferred_sync_keeps_float32_partials_of_float32_parameters(world, kind):
    outs = simulate(world, _deferred_rank, world, kind, timeout=60)
    x, dy, weight, bias = _problem(world, torch.bfloat16, True)
    ref = _reference_grads(kind, x, dy, weight.float(), bias.float())
    for y_dtype, grads in outs:
        assert y_dtype == torch.bfloat16
        for pname, grad in grads.items():
            assert grad.dtype == torch.float32
            torch.testing.assert_close(grad.double(), ref[pname], rtol=1e-5, atol=1e-4 * A)


def test_problem_splits_as_documented():
    """Guard the construction the tests rely on: sequence blocks line up with shard_sizes."""
    for world in (1, 2, 3, 4):
        x, _, _, _ = _problem(world, torch.float32, True)
        assert shard_sizes(x.shape[0], world) == [8] * world
