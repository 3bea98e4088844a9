"""The bad-input matrix: every public class and function of ``distnorm.__all__``, fed wrong inputs.

Rows are public names, columns the kinds of mistake (wrong shape, wrong dtype, mixed devices —
the "meta" device plays the second device on CPU —, zero-size tensors, an empty local batch,
invalid eps/momentum/sizes, a wrong group, non-finite values). Each cell asserts the documented
error (type and a message naming the argument, the value and the rank) or the documented result.
``test_every_public_name_is_covered`` fails when a public name has no row. The number of cases
is reported in docs/troubleshooting.md.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm import debug
from distnorm.comm import shard_sizes
from distnorm.tensor_parallel import (
    ColumnParallelLinear,
    CRMSNorm,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
    SingleScaleRMSNorm,
    layer_norm_scaling,
)
from distnorm.testing import simulate, split_for_world
from tests.test_checkpoint_safety import C as DP_C
from tests.test_checkpoint_safety import _dp_norms

H = 8
TIMEOUT = 60
RANK0 = r"\(rank 0"  # every message ends naming the rank

# --------------------------------------------------------------------------------------------
# Tensor-parallel norms: x [*, H] (sequence parallel) or x_shard [*, H_local] (sharded)
# --------------------------------------------------------------------------------------------

TP_NORMS: dict[str, Callable[..., nn.Module]] = {
    "SequenceParallelLayerNorm": lambda **kw: SequenceParallelLayerNorm(H, **kw),
    "SequenceParallelRMSNorm": lambda **kw: SequenceParallelRMSNorm(H, **kw),
    "ShardedLayerNorm": lambda **kw: ShardedLayerNorm(H, **kw),
    "ShardedRMSNorm": lambda **kw: ShardedRMSNorm(H, **kw),
    "SingleScaleRMSNorm": lambda **kw: SingleScaleRMSNorm(H, **kw),
    "SingleScaleRMSNorm[sharded]": lambda **kw: SingleScaleRMSNorm(H, parallel="sharded", **kw),
    "CRMSNorm": lambda **kw: CRMSNorm(H, **kw),
    "CRMSNorm[sharded]": lambda **kw: CRMSNorm(H, parallel="sharded", **kw),
}
SHARDED = [n for n in TP_NORMS if "Sharded" in n or "[sharded]" in n]
SEQUENCE = [n for n in TP_NORMS if n not in SHARDED]
_NAME = {n: n.split("[")[0] for n in TP_NORMS}


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize(
    "x, exc, msg",
    [
        (torch.randn(3, H - 1), ValueError, r"x last dim must be .* = 8, got shape \(3, 7\) "),
        (torch.tensor(1.0), ValueError, r"x last dim must be .* = 8, got shape \(\) "),
        (torch.ones(3, H, dtype=torch.int64), TypeError, r"x must be a floating-point tensor, got torch.int64 "),
        (torch.ones(3, H, dtype=torch.bool), TypeError, r"x must be a floating-point tensor, got torch.bool "),
        ([1.0] * H, TypeError, r"x must be a floating-point tensor, got list "),
    ],
    ids=["wrong_last_dim", "zero_dim", "int_dtype", "bool_dtype", "not_a_tensor"],
)
def test_tp_norm_bad_input(name, x, exc, msg):
    with pytest.raises(exc, match=rf"{_NAME[name]}: {msg}{RANK0} of 1\)"):
        TP_NORMS[name]()(x)


@pytest.mark.parametrize("name", TP_NORMS)
def test_tp_norm_mixed_devices(name):
    norm = TP_NORMS[name](device="meta")
    with pytest.raises(ValueError, match=rf"{_NAME[name]}: weight must be on x's device cpu, got weight on meta {RANK0}"):
        norm(torch.ones(3, H))


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tp_norm_output_in_input_dtype_with_float32_parameters(name, dtype):
    y = TP_NORMS[name]()(torch.randn(3, H, dtype=dtype))
    assert y.dtype == dtype and y.shape == (3, H)


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize("shape", [(0, H), (2, 0, H)], ids=["no_tokens", "empty_batch_dim"])
def test_tp_norm_zero_size_input(name, shape):
    norm = TP_NORMS[name]()
    x = torch.ones(shape, requires_grad=True)
    y = norm(x)
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape
    for p in norm.parameters():  # no tokens: zero parameter gradients, not None and not NaN
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize(
    "eps, msg",
    [(-1.0, r"eps must be >= 0, got -1.0"), (float("nan"), r"eps must be a finite float, got nan"),
     (float("inf"), r"eps must be a finite float, got inf"), ("1e-5", r"eps must be a finite float, got '1e-5'"),
     (True, r"eps must be a finite float, got True")],
    ids=["negative", "nan", "inf", "str", "bool"],
)
def test_tp_norm_invalid_eps(name, eps, msg):
    with pytest.raises(ValueError, match=rf"{_NAME[name]}: {msg} {RANK0}"):
        TP_NORMS[name](eps=eps)


_TP_NORM_CLASSES = [SequenceParallelLayerNorm, SequenceParallelRMSNorm, ShardedLayerNorm, ShardedRMSNorm,
                    SingleScaleRMSNorm, CRMSNorm]
_BAD_SHAPES = {"zero": 0, "negative": -3, "float": 8.0, "two_dims": (8, 8), "empty": (), "bool": True}


@pytest.mark.parametrize(
    "cls,shape",
    [pytest.param(cls, shape, id=f"{sid}-{cls.__name__}") for sid, shape in _BAD_SHAPES.items()
     for cls in _TP_NORM_CLASSES
     # the sequence-parallel norms take several trailing dims, as nn.LayerNorm does
     if not (sid == "two_dims" and cls in (SequenceParallelLayerNorm, SequenceParallelRMSNorm))])
def test_tp_norm_invalid_normalized_shape(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: normalized_shape must be a positive int .*got {shape!r}".replace("(", r"\(").replace(")", r"\)")):
        cls(shape)


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize("group", [2, "tp", dist.ReduceOp.SUM], ids=["int", "str", "not_a_group"])
def test_tp_norm_wrong_group_type(name, group):
    with pytest.raises(TypeError, match=rf"group must be a torch.distributed.ProcessGroup or None, got .* {RANK0}"):
        TP_NORMS[name](group=group)


def _too_small_hidden(rank, name):
    kwargs = {"parallel": "sharded"} if name.endswith("[sharded]") else {}
    cls = {"ShardedLayerNorm": ShardedLayerNorm, "ShardedRMSNorm": ShardedRMSNorm,
           "SingleScaleRMSNorm": SingleScaleRMSNorm, "CRMSNorm": CRMSNorm}[_NAME[name]]
    cls(3, group=dist.group.WORLD, **kwargs)  # 3 hidden columns over 4 ranks


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_norm_group_larger_than_hidden(name):
    with pytest.raises(ValueError, match=r"a group of size 4 does not fit normalized_shape = 3: .* \(rank \d of 4\)"):
        simulate(4, _too_small_hidden, name, timeout=TIMEOUT)


def _sharded_wrong_shard(rank, name):
    norm = TP_NORMS[name](group=dist.group.WORLD)
    norm(torch.ones(2, H))  # the full hidden size where this rank's shard is expected


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_norm_fed_the_full_hidden_size(name):
    # 8 over 3 ranks: shards 3, 3, 2
    with pytest.raises(ValueError, match=r"x last dim must be .*= [32], got shape \(2, 8\) \(rank \d of 3\)"):
        simulate(3, _sharded_wrong_shard, name, timeout=TIMEOUT)


def _empty_local_batch(rank, name, x_full, world):
    """Sequence parallel with fewer tokens than ranks: the last ranks hold no tokens at all."""
    norm = TP_NORMS[name](group=dist.group.WORLD, dtype=torch.float64)
    x = split_for_world(x_full, world)[rank].clone().requires_grad_()
    y = norm(x)
    y.backward(torch.ones_like(y) * (torch.arange(x.shape[0], dtype=x.dtype)[:, None] + 1 + rank))
    return y.detach(), x.grad, [p.grad.clone() for p in norm.parameters()]


@pytest.mark.parametrize("name", SEQUENCE)
def test_sequence_parallel_norm_rank_with_no_tokens(name):
    world = 4
    x_full = torch.randn(2, H, dtype=torch.float64)  # 2 tokens over 4 ranks: ranks 2, 3 get none
    outs = simulate(world, _empty_local_batch, name, x_full, world, timeout=TIMEOUT)
    assert [o[0].shape[0] for o in outs] == shard_sizes(2, world)
    ref = TP_NORMS[name](dtype=torch.float64)  # the same tokens on one rank
    x_ref = x_full.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(torch.tensor([[1.0], [2.0]], dtype=torch.float64).expand_as(y_ref))
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), y_ref.detach(), rtol=0, atol=1e-12)
    for o in outs:  # every rank, empty or not, ends with the global parameter gradients
        for g, p in zip(o[2], ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=-1)


@pytest.mark.parametrize("name", TP_NORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_tp_norm_propagates_nonfinite_like_torch(name, bad):
    x = torch.randn(4, H)
    x[1, 3] = bad
    y = TP_NORMS[name]()(x)
    assert torch.equal(_nonfinite_rows(y), _nonfinite_rows(x))  # not masked, and not spread to other tokens
    torch_y = {"SequenceParallelLayerNorm": lambda: F.layer_norm(x, (H,)),
               "ShardedLayerNorm": lambda: F.layer_norm(x, (H,)),
               "SequenceParallelRMSNorm": lambda: F.rms_norm(x, (H,), eps=1e-6),
               "ShardedRMSNorm": lambda: F.rms_norm(x, (H,), eps=1e-6)}.get(name)
    if torch_y is not None:  # the very same NaN/Inf pattern as torch's own norm
        ref = torch_y()
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))


# --------------------------------------------------------------------------------------------
# Parallel linears
# --------------------------------------------------------------------------------------------

LINEARS: dict[str, Callable[..., nn.Module]] = {
    "ColumnParallelLinear": lambda **kw: ColumnParallelLinear(H, 4, **kw),
    "RowParallelLinear": lambda **kw: RowParallelLinear(H, 4, **kw),
}


@pytest.mark.parametrize("name", LINEARS)
@pytest.mark.parametrize(
    "x, exc, msg",
    [
        (torch.randn(3, H - 1), ValueError, r"input last dim must be .* = 8, got shape \(3, 7\) "),
        (torch.ones(3, H, dtype=torch.int64), TypeError, r"input must be a floating-point tensor, got torch.int64 "),
        ("x", TypeError, r"input must be a floating-point tensor, got str "),
    ],
    ids=["wrong_last_dim", "int_dtype", "not_a_tensor"],
)
def test_linear_bad_input(name, x, exc, msg):
    with pytest.raises(exc, match=rf"{name}: {msg}{RANK0} of 1\)"):
        LINEARS[name]()(x)


@pytest.mark.parametrize("name", LINEARS)
def test_linear_mixed_devices(name):
    with pytest.raises(ValueError, match=rf"{name}: input must be on the weight's device meta, got cpu {RANK0}"):
        LINEARS[name](device="meta")(torch.ones(3, H))


@pytest.mark.parametrize("name", LINEARS)
def test_linear_zero_size_input(name):
    x = torch.ones(0, H, requires_grad=True)
    y = LINEARS[name]()(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, H)


@pytest.mark.parametrize("name", LINEARS)
@pytest.mark.parametrize("arg", ["in_features", "out_features"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_linear_invalid_sizes(name, arg, value):
    kwargs = {"in_features": H, "out_features": 4, arg: value}
    cls = {"ColumnParallelLinear": ColumnParallelLinear, "RowParallelLinear": RowParallelLinear}[name]
    with pytest.raises(ValueError, match=rf"{name}: {arg} must be a positive int, got {value!r} {RANK0}"):
        cls(**kwargs)


@pytest.mark.parametrize("name", LINEARS)
def test_linear_wrong_group_type(name):
    with pytest.raises(TypeError, match=rf"group must be a torch.distributed.ProcessGroup or None, got int 2 {RANK0}"):
        LINEARS[name](group=2)


def _sequence_parallel_token_mismatch(rank):
    lin = ColumnParallelLinear(H, 4, group=dist.group.WORLD, sequence_parallel=True)
    lin(torch.ones(4, H), num_tokens=9)  # shard_sizes(9, 3) = 3, 3, 3: every rank holds 4 instead


def test_column_parallel_sequence_parallel_wrong_token_shard():
    with pytest.raises(ValueError, match=r"all_gather_uneven: tensor must have size 3 along dim 0 on rank \d .*got shape \(4, 8\)"):
        simulate(3, _sequence_parallel_token_mismatch, timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------
# Running-statistics norms: x [B, T, C] (channel_dim=-1) or [N, C, L] (channel_dim=1)
# --------------------------------------------------------------------------------------------

DP_NORMS = _dp_norms()  # name -> (factory, global input shape); C = 6 channels
BATCH_NORMS = {"SyncBatchNorm", "AlphaBatchNorm"}


def _dp(name, **kw):
    return DP_NORMS[name][0](**kw)


def _dp_cdim(name):
    return 1 if DP_NORMS[name][1][1] == DP_C else -1


@pytest.mark.parametrize("name", DP_NORMS)
@pytest.mark.parametrize("kind", ["wrong_channels", "one_dim", "int_dtype", "not_a_tensor", "mask_shape", "mask_dtype"])
def test_dp_norm_bad_input(name, kind):
    shape = list(DP_NORMS[name][1])
    c_dim = _dp_cdim(name)
    no_c = [s for i, s in enumerate(shape) if i != c_dim % len(shape)]
    wrong = list(shape)
    wrong[c_dim] = DP_C + 1
    cls = name
    bn = name in BATCH_NORMS  # SyncBatchNorm's family words a few messages like torch.nn.SyncBatchNorm
    cases = {
        "wrong_channels": ((torch.randn(wrong),), ValueError,
                           rf"{cls}: input must have num_features = 6 channels on channel_dim={c_dim}, got shape" if bn else
                           rf"{cls}: input has 7 channels on channel_dim={c_dim}, expected num_features=6"),
        "one_dim": ((torch.randn(DP_C),), ValueError, rf"{cls}: input must have at least 2 dims .*got shape \(6,\)"),
        "int_dtype": ((torch.ones(shape, dtype=torch.int64),), TypeError, rf"{cls}: input must be a floating-point tensor, got torch.int64"),
        "not_a_tensor": (([1.0],), TypeError, rf"{cls}: input must be a floating-point tensor, got list"),
        "mask_shape": ((torch.randn(shape), torch.ones(3, 2, dtype=torch.bool)), ValueError,
                       rf"{cls}: mask must .*got (torch.bool )?\(3, 2\)"),
        "mask_dtype": ((torch.randn(shape), torch.ones(no_c)), TypeError if bn else ValueError,
                       rf"{cls}: mask must be a bool tensor .*got torch.float32"),
    }
    args, exc, msg = cases[kind]
    with pytest.raises(exc, match=msg + r".*rank 0( of 1)?\)"):
        _dp(name)(*args)


@pytest.mark.parametrize("name", DP_NORMS)
def test_dp_norm_mixed_devices(name):
    with pytest.raises(ValueError, match=rf"{name}: input must be on the module's device meta, got cpu \(rank 0( of 1)?\)"):
        _dp(name, device="meta")(torch.randn(DP_NORMS[name][1]))


@pytest.mark.parametrize("name", DP_NORMS)
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), "1e-5"], ids=["negative", "nan", "inf", "str"])
def test_dp_norm_invalid_eps(name, eps):
    owner = "RepBatchNorm" if name == "ProgressiveRepBN" else name  # built by its RepBatchNorm branch
    with pytest.raises(ValueError, match=rf"{owner}: eps must be a finite float >= 0, got {eps!r} \(rank 0( of 1)?\)"):
        _dp(name, eps=eps)


MOMENTUM_NORMS = ["UnifiedNorm", "RepBatchNorm", "ProgressiveRepBN", "BatchChannelNorm", "EvoNormB0", "SyncBatchNorm",
                  "AlphaBatchNorm"]


@pytest.mark.parametrize("name", MOMENTUM_NORMS)
@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_dp_norm_invalid_momentum(name, momentum):
    if name not in DP_NORMS:
        pytest.skip(f"{name} has not landed in this checkout")
    with pytest.raises(ValueError, match=rf"momentum must be .*got {momentum} \(rank 0( of 1)?\)"):
        _dp(name, momentum=momentum)


@pytest.mark.parametrize("arg", ["alpha_fwd", "alpha_bkw"])  # PowerNorm's momenta
def test_power_norm_invalid_alpha(arg):
    with pytest.raises(ValueError, match=rf"PowerNorm: {arg} must be in \[0, 1\), got 1.5 \(rank 0( of 1)?\)"):
        _dp("PowerNorm", **{arg: 1.5})


def test_evo_norm_s0_per_sample_norm():
    from distnorm.data_parallel.evo_norm import EvoNormS0

    with pytest.raises(ValueError, match=r"EvoNormS0: input has 7 channels on channel_dim=1, expected num_features=8"):
        EvoNormS0(8, groups=2)(torch.randn(2, 7, 3))
    with pytest.raises(TypeError, match=r"EvoNormS0: input must be a floating-point tensor, got torch.int64 \(rank 0( of 1)?\)"):
        EvoNormS0(8, groups=2)(torch.ones(2, 8, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"EvoNormS0: input must be on the module's device meta, got cpu \(rank 0( of 1)?\)"):
        EvoNormS0(8, groups=2, device="meta")(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"EvoNormS0: eps must be a finite float >= 0, got -1.0 \(rank 0( of 1)?\)"):
        EvoNormS0(8, groups=2, eps=-1.0)
    with pytest.raises(ValueError, match=r"EvoNormS0: groups must divide num_features=8, got 3"):
        EvoNormS0(8, groups=3)
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2"):
        EvoNormS0(8, groups=2, group=2)
    assert EvoNormS0(8, groups=2)(torch.randn(0, 8, 3)).shape == (0, 8, 3)  # per sample: empty is fine


@pytest.mark.parametrize("name", DP_NORMS)
def test_dp_norm_wrong_group_type(name):
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2 \(rank 0( of 1)?\)"):
        _dp(name, group=2)


@pytest.mark.parametrize("name", DP_NORMS)
def test_dp_norm_zero_size_input(name):
    shape = list(DP_NORMS[name][1])
    shape[0] = 0
    norm = _dp(name)
    if name == "AlphaBatchNorm":  # its eval calibrates with the test batch: an empty one has no statistics
        with pytest.raises(ValueError, match=r"AlphaBatchNorm: expected more than 1 value per channel"):
            norm.eval()(torch.randn(shape))
    else:
        assert norm.eval()(torch.randn(shape)).shape == tuple(shape)  # eval: an empty result
    msg = (r"expected more than 1 value per channel in training, got input shape \(0, 6, 3\)" if name in BATCH_NORMS
           else r"the global batch has no real elements .*in training mode \(rank 0( of 1)?\)")
    with pytest.raises(ValueError, match=msg):
        norm.train()(torch.randn(shape))  # training: no statistics to take


def _dp_empty_rank(rank, name, x_full, world):
    norm = _dp(name, group=dist.group.WORLD, dtype=torch.float64)
    x = split_for_world(x_full, world)[rank].clone().requires_grad_()
    y = norm(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, {k: v.clone() for k, v in norm.named_buffers()}


@pytest.mark.parametrize("name", DP_NORMS)
def test_dp_norm_rank_with_an_empty_local_batch(name):
    shape = list(DP_NORMS[name][1])
    shape[0] = 2  # 2 samples over 3 ranks: rank 2 holds none
    x_full = torch.randn(shape, dtype=torch.float64)
    outs = simulate(3, _dp_empty_rank, name, x_full, 3, timeout=TIMEOUT)
    assert outs[2][0].shape[0] == 0
    one = simulate(1, _dp_empty_rank, name, x_full, 1, timeout=TIMEOUT)[0]  # the same batch on one rank
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), one[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), one[1], rtol=0, atol=1e-12)
    for o in outs:  # the empty rank took part and holds the same statistics
        for k, v in one[2].items():
            torch.testing.assert_close(o[2][k], v, rtol=0, atol=1e-12, msg=k)


# --------------------------------------------------------------------------------------------
# Overlap: fused all-reduce/reduce-scatter + residual + RMSNorm, token-split planning, TokenWeaver
# --------------------------------------------------------------------------------------------

_P, _R, _W = torch.randn(4, H), torch.randn(4, H), torch.ones(H)
FUSED = "fused_allreduce_rms_norm"
FUSED_CASES: list[tuple[str, tuple, dict, type[Exception], str]] = [
    ("three_dims", (torch.randn(2, 4, H), _R, _W), {}, ValueError, r"partial must be a 2-D \[tokens, hidden\] tensor, got \(2, 4, 8\)"),
    ("not_a_tensor", ([1.0], _R, _W), {}, ValueError, r"partial must be a 2-D \[tokens, hidden\] tensor, got list"),
    ("int_dtype", (_P.long(), _R, _W), {}, TypeError, r"partial must be a floating-point tensor, got torch.int64"),
    ("residual_shape", (_P, torch.randn(4, H - 1), _W), {}, ValueError, r"residual must have shape \(4, 8\) .*got \(4, 7\)"),
    ("residual_dtype", (_P, _R.double(), _W), {}, TypeError, r"residual dtype must equal partial's torch.float32, got torch.float64"),
    ("residual_meta", (_P, _R.to("meta"), _W), {}, ValueError, r"residual must be on partial's device cpu, got meta"),
    ("weight_meta", (_P, _R, _W.to("meta")), {}, ValueError, r"weight must be on partial's device cpu, got meta"),
    ("weight_shape", (_P, _R, torch.ones(H - 1)), {}, ValueError, r"weight must have shape \(8,\), got \(7,\)"),
    ("eps_negative", (_P, _R, _W, -1.0), {}, ValueError, r"eps must be a float >= 0, got -1.0"),
    ("eps_nan", (_P, _R, _W, float("nan")), {}, ValueError, r"eps must be a float >= 0, got nan"),
    ("mode", (_P, _R, _W), {"mode": "x"}, ValueError, r"mode must be one of \('allreduce', 'reduce_scatter'\), got 'x'"),
    ("backend", (_P, _R, _W), {"backend": "mpi"}, ValueError, r"backend must be one of .*got 'mpi'"),
]


@pytest.mark.parametrize("args, kwargs, exc, msg", [c[1:] for c in FUSED_CASES], ids=[c[0] for c in FUSED_CASES])
def test_fused_allreduce_rms_norm_bad_input(args, kwargs, exc, msg):
    from distnorm.overlap import fused_allreduce_rms_norm

    with pytest.raises(exc, match=rf"{FUSED}: {msg} \(rank 0 of 1\)"):
        fused_allreduce_rms_norm(*args, group=None, **kwargs)


def test_fused_allreduce_rms_norm_wrong_group_and_zero_tokens():
    from distnorm.overlap import fused_allreduce_rms_norm

    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2"):
        fused_allreduce_rms_norm(_P, _R, _W, group=2)
    normed, residual = fused_allreduce_rms_norm(torch.randn(0, H), torch.randn(0, H), _W, group=None)
    assert normed.shape == (0, H) and residual.shape == (0, H)


def test_token_split_planning_bad_arguments():
    from distnorm.overlap import DeviceProfile, ParallelMLPBlock, TokenSplitPlan, TokenWeaver, plan_token_split

    for name, args in (("num_tokens", (0, 8, 2)), ("hidden", (8, -1, 2)), ("world", (8, 8, 1.5))):
        with pytest.raises(ValueError, match=rf"plan_token_split: {name} must be a positive int, got .* \(rank 0\)"):
            plan_token_split(*args)
    with pytest.raises(ValueError, match=r"plan_token_split: mode must be 'allreduce' or 'reduce_scatter', got 'x'"):
        plan_token_split(8, 8, 2, mode="x")
    with pytest.raises(ValueError, match=r"TokenSplitPlan: first must be in \[1, num_tokens=4\], got 5"):
        TokenSplitPlan(num_tokens=4, first=5)
    with pytest.raises(ValueError, match=r"DeviceProfile.calibrate: .* needs >= 2 distinct sizes"):
        DeviceProfile.calibrate(compute=[(128, 1e-3)], comm=[(1024, 1e-5)], flops_per_token=1.0)
    with pytest.raises(ValueError, match=r"TokenWeaver: blocks must be a non-empty sequence, got 0 blocks \(rank 0 of 1\)"):
        TokenWeaver([], None)
    with pytest.raises(TypeError, match=r"TokenWeaver: blocks\[0\] \(Linear\) must have partial\(x\) and norm_weight"):
        TokenWeaver([nn.Linear(2, 2)], None)
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2"):
        TokenWeaver([ParallelMLPBlock(H, 16)], 2)


# --------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------

def _nan_grad_linear() -> nn.Module:
    lin = nn.Linear(2, 2)
    lin.weight.grad = torch.full((2, 2), float("nan"))
    return lin


FUNCTION_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("shard_sizes", lambda: distnorm.shard_sizes(-1, 2), ValueError, r"n must be an int >= 0, got -1 \(rank 0\)"),
    ("shard_sizes", lambda: distnorm.shard_sizes(4, 0), ValueError, r"world must be a positive int, got 0 \(rank 0\)"),
    ("shard_sizes", lambda: distnorm.shard_sizes(2.5, 2), ValueError, r"n must be an int >= 0, got 2.5"),
    ("layer_norm_scaling", lambda: layer_norm_scaling(0), ValueError, r"layer_index must be an int >= 1 .*got 0"),
    ("layer_norm_scaling", lambda: layer_norm_scaling(1.5), ValueError, r"layer_index must be an int >= 1 .*got 1.5"),
    ("init_distributed", lambda: distnorm.init_distributed(tp=0), ValueError, r"tp must be a positive int, got 0 \(rank 0\)"),
    ("init_distributed", lambda: distnorm.init_distributed(tp="2"), ValueError, r"tp must be a positive int, got '2'"),
    ("init_distributed", lambda: distnorm.init_distributed(timeout=30), TypeError,
     r"timeout must be a datetime.timedelta, got 30"),
    ("check_replicas", lambda: debug.check_replicas(torch.ones(2), None), TypeError,
     r"model must be an nn.Module, got Tensor \(rank 0\)"),
    ("sync_running_stats", lambda: distnorm.sync_running_stats(nn.BatchNorm1d(4), None, op="median"), ValueError,
     r"op must be 'mean', 'sum', 'max' or 'min', got 'median' \(rank 0 of 1\)"),
    ("sync_running_stats", lambda: distnorm.sync_running_stats(torch.ones(2), None), TypeError,
     r"sync_running_stats: model must be an nn.Module, got Tensor \(rank 0 of 1\)"),
    ("sync_running_stats", lambda: distnorm.sync_running_stats(nn.BatchNorm1d(4), 2), TypeError,
     r"group must be a torch.distributed.ProcessGroup or None, got int 2"),
    ("broadcast_running_stats", lambda: distnorm.broadcast_running_stats(nn.BatchNorm1d(4), 1, None), ValueError,
     r"src must be a rank in \[0, 1\) of the group, got 1 \(rank 0 of 1\)"),
    ("broadcast_running_stats", lambda: distnorm.broadcast_running_stats(torch.ones(2), 0, None), TypeError,
     r"broadcast_running_stats: model must be an nn.Module, got Tensor"),
    ("recalibrate", lambda: distnorm.recalibrate(torch.ones(2), [torch.ones(3, 4)], None), TypeError,
     r"recalibrate: model must be an nn.Module, got Tensor \(rank 0 of 1\)"),
    ("convert_sync_batchnorm", lambda: distnorm.convert_sync_batchnorm(nn.BatchNorm1d(4), 2), TypeError,
     r"group must be a torch.distributed.ProcessGroup or None, got int 2"),
    ("convert_sync_batchnorm", lambda: distnorm.convert_sync_batchnorm(torch.ones(2), None), TypeError,
     r"convert_sync_batchnorm: module must be an nn.Module, got Tensor \(rank 0 of 1\)"),
    ("convert_sync_batchnorm", lambda: distnorm.convert_sync_batchnorm(nn.BatchNorm1d(4), None, channel_dim=2),
     ValueError, r"SyncBatchNorm: channel_dim must be 1 or -1, got 2 \(rank 0 of 1\)"),
    ("clip_grad_norm_", lambda: distnorm.clip_grad_norm_(nn.Linear(2, 2), 0.0), ValueError,
     r"clip_grad_norm_: max_norm must be a finite float > 0, got 0.0 \(rank 0\)"),
    ("clip_grad_norm_", lambda: distnorm.clip_grad_norm_(nn.Linear(2, 2), float("inf")), ValueError,
     r"clip_grad_norm_: max_norm must be a finite float > 0, got inf \(rank 0\)"),
    ("clip_grad_norm_", lambda: distnorm.clip_grad_norm_(_nan_grad_linear(), 1.0, error_if_nonfinite=True),
     RuntimeError, r"grad_norm: the total norm of order 2.0 of the gradients is nan, .* \(rank 0\)"),
    ("grad_norm", lambda: distnorm.grad_norm(nn.Linear(2, 2), norm_type=0), ValueError,
     r"grad_norm: norm_type must be > 0 or inf, got 0 \(rank 0\)"),
    ("grad_norm", lambda: distnorm.grad_norm(torch.ones(2)), TypeError,
     r"grad_norm: model must be an nn.Module, got Tensor \(rank 0\)"),
]


@pytest.mark.parametrize("name, call, exc, msg", FUNCTION_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FUNCTION_CASES)])
def test_function_bad_arguments(name, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def _tp_does_not_divide(rank):
    distnorm.init_distributed(tp=2)


def test_init_distributed_tp_must_divide_the_world():
    with pytest.raises(ValueError, match=r"tp=2 must divide the world size 3 \(valid: \[1, 3\]\) \(rank \d\)"):
        simulate(3, _tp_does_not_divide, timeout=TIMEOUT)


def _bad_mesh(rank):
    from torch.distributed.device_mesh import init_device_mesh

    distnorm.Topology.from_mesh(init_device_mesh("cpu", (2,), mesh_dim_names=("data",)))


def test_topology_from_mesh_wrong_axis_names():
    with pytest.raises(ValueError, match=r"mesh axes must be named .*got mesh_dim_names=\('data',\) \(rank \d\)"):
        simulate(2, _bad_mesh, timeout=TIMEOUT)


def test_count_collectives_zero_size_and_local_path():
    with distnorm.count_collectives() as c:
        TP_NORMS["ShardedLayerNorm"]()(torch.ones(0, H))
    assert c.counts == {}  # group None: no collectives, even for an empty input


# --------------------------------------------------------------------------------------------
# Conversion and config (launch/conversion issue)
# --------------------------------------------------------------------------------------------

CONVERT_NAMES = ["to_sequence_parallel", "to_sharded", "to_sync_batch_norm", "to_power_norm", "to_unified_norm"]


def test_convert_norms_bad_arguments():
    import distnorm.convert as convert
    with pytest.raises(TypeError, match=r"convert_norms: model must be an nn.Module, got Tensor"):
        convert.convert_norms(torch.ones(2), lambda m: None)
    with pytest.raises(TypeError, match=r"convert_norms: factory must be callable"):
        convert.convert_norms(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match=r"convert_norms: factory returned int"):
        convert.convert_norms(nn.Sequential(nn.LayerNorm(H)), lambda m: 3 if isinstance(m, nn.LayerNorm) else None)


@pytest.mark.parametrize("name", CONVERT_NAMES)
def test_conversion_factory_wrong_group(name):
    import distnorm.convert as convert
    norm = nn.LayerNorm(H) if name in ("to_sequence_parallel", "to_sharded") else nn.BatchNorm1d(H)
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2"):
        convert.convert_norms(nn.Sequential(norm), getattr(convert, name)(2))


def test_fold_and_pre_ln_bad_arguments():
    import distnorm.convert as convert
    with pytest.raises(ValueError, match=r"fold_norms: the model must be in eval mode"):
        convert.fold_norms(nn.Sequential(nn.BatchNorm1d(H), nn.Linear(H, 2)).train(), torch.randn(4, H))
    with pytest.raises(ValueError, match=r"pre_ln_to_pre_rmsnorm: expected a GPT-2-style model"):
        convert.pre_ln_to_pre_rmsnorm(nn.Linear(2, 2))


def test_freeze_norms_and_frozen_scale_norm_bad_inputs():
    with pytest.raises(TypeError, match=r"freeze_norms: model must be an nn.Module, got Tensor"):
        distnorm.freeze_norms(torch.ones(2), [])
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got int 2"):
        distnorm.freeze_norms(nn.Sequential(nn.LayerNorm(H)), [torch.randn(2, H)], group=2)
    with pytest.raises(ValueError, match=r"freeze_norms: batches is empty on every rank.*" + RANK0):
        distnorm.freeze_norms(nn.Sequential(nn.LayerNorm(H)), [])
    with pytest.raises(ValueError, match=r"FrozenScaleNorm: normalized_shape must be a positive int.*got 0 " + RANK0):
        distnorm.FrozenScaleNorm(0)
    with pytest.raises(ValueError, match=r"FrozenScaleNorm: rstd must be a finite float > 0, got nan " + RANK0):
        distnorm.FrozenScaleNorm(H, float("nan"))
    with pytest.raises(ValueError, match=r"FrozenScaleNorm: x last dim must be normalized_shape = 8, got shape \(2, 3\)"):
        distnorm.FrozenScaleNorm(H)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"FrozenScaleNorm: weight must be on x's device meta"):
        distnorm.FrozenScaleNorm(H)(torch.randn(2, H, device="meta"))


def test_dist_norm_config_bad_values():
    import distnorm.config as config
    with pytest.raises(ValueError, match=r"distnorm.bogus: unknown key \(value 1\); valid keys"):
        config.DistNormConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"distnorm.tp_size: must be an int >= 1, got 0"):
        config.DistNormConfig.from_dict({"tp_size": 0})
    with pytest.raises(TypeError, match=r"distnorm.tp_size: must be int, got str '2'"):
        config.DistNormConfig.from_dict({"tp_size": "2"})


# --------------------------------------------------------------------------------------------
# Coverage: every public name has a row above
# --------------------------------------------------------------------------------------------

COVERED = {
    *(_NAME[n] for n in TP_NORMS), *LINEARS, *DP_NORMS, "EvoNormS0", *(c[0] for c in FUNCTION_CASES),
    "Topology", "init_distributed", "count_collectives",
    FUSED, "plan_token_split", "TokenSplitPlan", "DeviceProfile", "TokenWeaver",
    "convert_norms", *CONVERT_NAMES, "fold_norms", "pre_ln_to_pre_rmsnorm", "DistNormConfig",
    "freeze_norms", "FrozenScaleNorm",
}
# Public names with no input to get wrong, with the reason.
NOT_APPLICABLE: dict[str, str] = {}


def _exists(name: str) -> bool:
    try:
        getattr(distnorm, name)
    except (ImportError, AttributeError):  # its issue has not landed in this checkout
        return False
    return True


def test_every_public_name_is_covered():
    modules = set(distnorm._SUBMODULES)
    public = [n for n in distnorm.__all__ if n not in modules and _exists(n)]
    missing = sorted(set(public) - COVERED - set(NOT_APPLICABLE))
    assert not missing, f"public names without a bad-input row: {missing}"
