"""The tensor-parallel modules behave like torch's modules: meta-device init, ``normalized_shape``,
parameter shapes, ``torch.compile(fullgraph=True)``, and what they save for backward.

Every module of ``distnorm.tensor_parallel`` is covered: the sequence-parallel and hidden-sharded
LayerNorm / RMSNorm, ``SingleScaleRMSNorm`` and ``CRMSNorm`` in both forms, and the parallel linears.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.testing
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distnorm import kernels
from distnorm.tensor_parallel import (
    ColumnParallelLinear,
    CRMSNorm,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
    SingleScaleRMSNorm,
)
from distnorm.testing import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_local import Step, saved_bytes  # the benchmark's own measurement

H = 12


def _gen():
    return torch.Generator().manual_seed(3)


# name -> builder(group, **factory kwargs); norms with zero_centered_gamma=True where they take it, so a
# reset parameter (0) differs from to_empty()'s memory more often than a 1 would
MODULES = {
    "SequenceParallelLayerNorm": lambda g, **kw: SequenceParallelLayerNorm(H, group=g, zero_centered_gamma=True, **kw),
    "SequenceParallelRMSNorm": lambda g, **kw: SequenceParallelRMSNorm(H, group=g, **kw),
    "ShardedLayerNorm": lambda g, **kw: ShardedLayerNorm(H, group=g, **kw),
    "ShardedRMSNorm": lambda g, **kw: ShardedRMSNorm(H, group=g, zero_centered_gamma=True, **kw),
    "SingleScaleRMSNorm": lambda g, **kw: SingleScaleRMSNorm(H, group=g, **kw),
    "SingleScaleRMSNorm[sharded]": lambda g, **kw: SingleScaleRMSNorm(H, parallel="sharded", group=g, **kw),
    "CRMSNorm": lambda g, **kw: CRMSNorm(H, group=g, **kw),
    "CRMSNorm[sharded]": lambda g, **kw: CRMSNorm(H, parallel="sharded", group=g, **kw),
    "ColumnParallelLinear": lambda g, **kw: ColumnParallelLinear(H, 10, group=g, generator=_gen(), **kw),
    "RowParallelLinear": lambda g, **kw: RowParallelLinear(H, 10, group=g, generator=_gen(), **kw),
}
NORMS = [n for n in MODULES if "Linear" not in n]


def _meta_then_reset(name, group):
    fresh = MODULES[name](group)
    meta = MODULES[name](group, device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    return fresh.state_dict(), meta.state_dict()


@pytest.mark.parametrize("name", MODULES)
def test_meta_init_then_reset_equals_a_fresh_module(name):
    fresh, restored = _meta_then_reset(name, None)
    assert fresh.keys() == restored.keys() and fresh
    for key in fresh:
        assert fresh[key].dtype == restored[key].dtype
        assert torch.equal(fresh[key], restored[key]), f"{name}.{key}"


def _meta_rank(rank, name):
    return _meta_then_reset(name, dist.group.WORLD)


@pytest.mark.parametrize("name", ["ShardedLayerNorm", "CRMSNorm[sharded]", "ColumnParallelLinear", "RowParallelLinear"])
def test_meta_init_of_sharded_parameters_at_world_3(name):
    for fresh, restored in simulate(3, _meta_rank, name, timeout=60):
        for key in fresh:
            assert torch.equal(fresh[key], restored[key]), f"{name}.{key}"


def test_linear_reset_redraws_the_construction_time_init():
    lin = ColumnParallelLinear(H, 10, generator=_gen())
    first = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.zero_()
    lin.reset_parameters()
    assert torch.equal(lin.weight, first)
    torch.manual_seed(7)  # without a generator: the global RNG, as nn.Linear
    a = RowParallelLinear(H, 10).weight.detach().clone()
    torch.manual_seed(7)
    meta = RowParallelLinear(H, 10, device="meta").to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.weight, a)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("shape", [H, np.int64(H), [H], (H,), torch.Size([H])],
                         ids=["int", "numpy", "list", "tuple", "size"])
def test_normalized_shape_is_stored_as_torch_stores_it(name, shape):
    cls = type(MODULES[name](None))
    kw = {"parallel": "sharded"} if name.endswith("[sharded]") else {}
    mod = cls(shape, **kw)
    assert mod.normalized_shape == (H,) and type(mod.normalized_shape) is tuple
    assert mod.normalized_shape == nn.LayerNorm(shape).normalized_shape


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_sequence_parallel_norm_over_several_trailing_dims_matches_torch(rms):
    shape = (3, 4)
    x = torch.randn(5, *shape, dtype=torch.float64, requires_grad=True)
    mod = (SequenceParallelRMSNorm if rms else SequenceParallelLayerNorm)(shape, dtype=torch.float64)
    with torch.no_grad():
        mod.weight.normal_()
    assert mod.weight.shape == shape and mod.normalized_shape == shape
    y = mod(x)
    x_ref, w_ref = x.detach().clone().requires_grad_(), mod.weight.detach().clone().requires_grad_()
    y_ref = F.rms_norm(x_ref, shape, w_ref, mod.eps) if rms else F.layer_norm(x_ref, shape, w_ref, mod.bias, mod.eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(mod.weight.grad, w_ref.grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"x trailing dims must be normalized_shape = \(3, 4\), got shape \(5, 4, 3\)"):
        mod(torch.randn(5, 4, 3, dtype=torch.float64))


def _input(name):
    return torch.randn(6, H)


def _bad(p):
    return nn.Parameter(torch.ones(p.shape[0] + 1, *p.shape[1:]))


@pytest.mark.parametrize("name", MODULES)
def test_parameters_of_the_wrong_shape_are_refused(name):
    mod = MODULES[name](None)
    good = tuple(mod.weight.shape)
    bad = _bad(mod.weight)
    msg = rf"{type(mod).__name__}: weight has shape \({good[0] + 1},.*\), expected \({good[0]},.*\) .*\(rank 0 of 1\)"
    with pytest.raises(ValueError, match=msg):  # passed through functional_call
        torch.func.functional_call(mod, {"weight": bad}, (_input(name),))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .* expects .*\(rank 0 of 1\)"):  # loaded
        mod.load_state_dict({**mod.state_dict(), "weight": bad.detach()})
    mod.weight = bad  # assigned
    with pytest.raises(ValueError, match=msg):
        mod(_input(name))


def _compile_case(name):
    torch._dynamo.reset()
    mod = MODULES[name](None)
    x = _input(name).unsqueeze(0).expand(2, -1, -1).contiguous().requires_grad_()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mod, fullgraph=True, backend=counter)
    outs = []
    for fn in (compiled, mod):
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        y = fn(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in mod.parameters()]))
    return counter.frame_count, outs


@pytest.mark.parametrize("name", MODULES)
def test_compiles_fullgraph_with_no_graph_break_at_world_1(name):
    frames, (compiled, eager) = _compile_case(name)
    assert frames == 1  # one graph; fullgraph=True would have raised at a break
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


SAVED = {  # step builders: the local path of each norm, fp32 and bf16 (fresh modules)
    "SequenceParallelLayerNorm": lambda dt: SequenceParallelLayerNorm(512, dtype=dt),
    "SequenceParallelRMSNorm": lambda dt: SequenceParallelRMSNorm(512, dtype=dt),
    "ShardedLayerNorm": lambda dt: ShardedLayerNorm(512, dtype=dt),
    "ShardedRMSNorm": lambda dt: ShardedRMSNorm(512, dtype=dt),
    "SingleScaleRMSNorm": lambda dt: SingleScaleRMSNorm(512, dtype=dt),
    "CRMSNorm": lambda dt: CRMSNorm(512, dtype=dt),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [*SAVED, "add_rms_norm"])
def test_saves_only_the_input_and_per_row_statistics(name, dtype):
    tokens = 64
    x = torch.randn(tokens, 512, dtype=dtype, requires_grad=True)
    if name == "add_rms_norm":
        r, w = torch.randn_like(x, requires_grad=True), torch.ones(512, dtype=dtype, requires_grad=True)
        step = Step(lambda: kernels.add_rms_norm(x, r, w), [x, r], [w], [])
    else:
        mod = SAVED[name](dtype)
        step = Step(lambda: mod(x), [x], list(mod.parameters()), [])
    extra = saved_bytes(step)
    # at most two float32 numbers per row (LayerNorm: mean, rstd; CRMSNorm: rstd, Σx; RMSNorm: rstd)
    assert extra <= 2 * 4 * tokens, (name, extra)
    # ... which is what torch's own nn.RMSNorm does not manage on the CPU (x in float32, and more)
    rms = nn.RMSNorm(512, dtype=dtype)
    assert saved_bytes(Step(lambda: rms(x), [x], list(rms.parameters()), [])) >= x.nbytes


def test_local_layer_norm_runs_torchs_native_kernel(monkeypatch):
    calls = []
    native = torch.native_layer_norm
    monkeypatch.setattr(torch, "native_layer_norm", lambda *a: calls.append(a[0].dtype) or native(*a))
    for mod in (SequenceParallelLayerNorm(H), ShardedLayerNorm(H)):
        mod(torch.randn(3, H, dtype=torch.bfloat16)).sum().backward()
    assert calls == [torch.bfloat16, torch.bfloat16]  # one fused call per forward, on the bf16 input itself


def _fold_rank(rank):
    import distnorm as dn

    model = nn.Sequential(SequenceParallelLayerNorm(8, group=dist.group.WORLD), nn.Linear(8, 4)).double().eval()
    g = torch.Generator().manual_seed(0)  # the same parameters on every rank (replicated)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    y = model(x)
    dn.fold_norms(model, (x,))
    return (model(x) - y).abs().max().item(), model[0].weight.detach().clone()


def test_fold_norms_still_folds_a_sequence_parallel_norm_at_world_2():
    """``normalized_shape`` became a tuple; ``fold_norms`` tells replicated from sharded parameters by ``hidden``."""
    for err, weight in simulate(2, _fold_rank, timeout=60):
        assert err < 1e-12 and torch.equal(weight, torch.ones(8, dtype=torch.float64))  # folded, then neutral
