"""Hidden-sharded LayerNorm/RMSNorm vs the float64 reference on worlds 1-4 (uneven hidden shards)."""

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.functional.layer_norm import layer_norm, rms_norm
from distnorm.tensor_parallel import ShardedLayerNorm, ShardedRMSNorm
from distnorm.testing import assert_close_to_reference, simulate, split_for_world
from tests.tensor_parallel.norm_cases import DTYPES, Case, check_all, make_case, reference


def _build(case: Case, group, world, rank):
    h = case.x.shape[-1]
    kw = {"zero_centered_gamma": case.zero_centered_gamma, "output_scale": case.output_scale,
          "group": group, "dtype": case.x.dtype}
    if case.kind == "layer":
        mod = ShardedLayerNorm(h, case.eps, bias=case.bias is not None, **kw)
    else:
        mod = ShardedRMSNorm(h, case.eps, **kw)
    with torch.no_grad():
        mod.weight.copy_(split_for_world(case.weight, world, dim=-1)[rank])
        if case.bias is not None:
            mod.bias.copy_(split_for_world(case.bias, world, dim=-1)[rank])
    return mod


def _rank(rank, world, cases):
    group = dist.group.WORLD if world > 1 else None
    out = []
    for case in cases:
        mod = _build(case, group, world, rank)
        x = split_for_world(case.x, world, dim=-1)[rank].requires_grad_()
        with count_collectives() as c_fwd:
            y = mod(x)
        with count_collectives() as c_bwd:
            y.backward(split_for_world(case.dy, world, dim=-1)[rank])
        out.append((y.detach(), x.grad, mod.weight.grad, None if mod.bias is None else mod.bias.grad, c_fwd, c_bwd))
    return out


def _cases(kind):
    cases = []
    for hidden in (10, 64):
        for dtype in DTYPES:
            cases.append(make_case(kind, hidden).cast(dtype))
            if dtype != torch.float64:
                cases.append(make_case(kind, hidden, offset=1e3, seed=1).cast(dtype))  # |mean|/std = 1e3
    cases.append(make_case(kind, 10, zero_centered_gamma=True, output_scale=0.5, seed=2))
    cases.append(make_case(kind, 64, zero_centered_gamma=True, output_scale=0.5, seed=2).cast(torch.bfloat16))
    if kind == "layer":
        cases.append(make_case(kind, 10, bias=False, seed=3))
    return cases


def _gather(per_rank, i):
    return None if per_rank[0][i] is None else torch.cat([p[i] for p in per_rank], dim=-1)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference(world, kind):
    cases = _cases(kind)
    outs = simulate(world, _rank, world, cases, timeout=60)
    for i, case in enumerate(cases):
        per_rank = [o[i] for o in outs]
        check_all(tuple(_gather(per_rank, j) for j in range(4)), case)
        tokens = case.x[..., 0].numel()
        wide = 8 if case.x.dtype == torch.float64 else 4
        fwd_bytes = tokens * (16 if kind == "layer" else wide)
        bwd_bytes = tokens * wide * (2 if kind == "layer" else 1)
        for *_, c_fwd, c_bwd in per_rank:
            if world == 1:
                assert c_fwd.counts == {} and c_bwd.counts == {}
            else:
                assert c_fwd.counts == {"all_reduce": 1} and c_fwd.bytes == {"all_reduce": fwd_bytes}
                assert c_bwd.counts == {"all_reduce": 1} and c_bwd.bytes == {"all_reduce": bwd_bytes}


def _float64_offset_rank(rank, world, case):
    return _rank(rank, world, [case])[0][:2]


@pytest.mark.parametrize("world", [2, 4])
def test_float64_at_large_offset(world):
    """The one-shot float64 exchange cancels the between-shard spread: (mean/std)² · 2⁻⁵³ relative."""
    case = make_case("layer", 64, offset=1e3, seed=4)
    outs = simulate(world, _float64_offset_rank, world, case, timeout=60)
    y_ref, dx_ref, *_ = reference(case)
    assert_close_to_reference(torch.cat([o[0] for o in outs], -1), y_ref, atol=1e-8, name="y")
    assert_close_to_reference(torch.cat([o[1] for o in outs], -1), dx_ref, atol=1e-8, name="dx")


def _functional_rank(rank, world, x, w, b):
    group = dist.group.WORLD if world > 1 else None
    xs, ws, bs = (split_for_world(t, world, dim=-1)[rank] for t in (x, w, b))
    return layer_norm(xs, ws, bs, 1e-5, group=group, hidden=x.shape[-1]), rms_norm(xs, ws, group=group, hidden=10)


def test_functional_api_picks_the_sharded_path():
    case = make_case("layer", 10)
    outs = simulate(3, _functional_rank, 3, case.x, case.weight, case.bias, timeout=60)
    y_ref = reference(case)[0]
    assert_close_to_reference(torch.cat([o[0] for o in outs], -1), y_ref, atol=1e-10)
    rms_case = Case("rms", case.x, case.dy, case.weight, None, 1e-6)
    assert_close_to_reference(torch.cat([o[1] for o in outs], -1), reference(rms_case)[0], atol=1e-10)
    one = layer_norm(case.x, case.weight, case.bias, 1e-5)  # group None: the local path
    assert_close_to_reference(one, y_ref, atol=1e-10)


def test_float16_output_dtype():
    norm = ShardedLayerNorm(10, dtype=torch.float16)
    assert norm(torch.randn(3, 10).half()).dtype == torch.float16


def _bad_hidden_rank(rank):
    ShardedRMSNorm(3, group=dist.group.WORLD)


def _bad_shard_rank(rank):
    ShardedLayerNorm(10, group=dist.group.WORLD)(torch.randn(2, 3))  # shards of 10 over 4: 3, 3, 2, 2


def _missing_hidden_rank(rank):
    rms_norm(torch.randn(2, 5), group=dist.group.WORLD)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"a group of size 4 does not fit normalized_shape = 3: .* \(rank \d of 4\)"):
        simulate(4, _bad_hidden_rank, timeout=30)
    with pytest.raises(ValueError, match=r"x last dim must be this rank's hidden shard shard_sizes\(10, 4\)\[[23]\] "
                                         r"= 2, got shape \(2, 3\) \(rank [23] of 4\)"):
        simulate(4, _bad_shard_rank, timeout=30)
    with pytest.raises(ValueError, match=r"hidden \(the full normalized size\) is required for a group of size 2"):
        simulate(2, _missing_hidden_rank, timeout=30)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch.int32 \(rank 0 of 1\)"):
        ShardedLayerNorm(4)(torch.ones(2, 4, dtype=torch.int32))
    norm = ShardedRMSNorm(4, device="meta")
    with pytest.raises(ValueError, match=r"weight must be on x's device cpu, got weight on meta"):
        norm(torch.randn(2, 4))
