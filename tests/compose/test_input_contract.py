"""Torch's input contract, across every distnorm module.

* ``normalized_shape`` takes what ``nn.LayerNorm`` takes (an int of any integral type, a tuple,
  list or ``torch.Size`` of one) and is stored as a tuple, like torch's; several normalized dims
  (which distnorm's last-dim norms do not do) are a ValueError naming the argument.
* A parameter of the wrong shape — assigned, passed through ``torch.func.functional_call`` or
  loaded — raises an error naming the parameter and the bad size, where broadcasting it would
  give a silently wrong answer. (Parallel linears follow ``nn.Linear``, which checks nothing at
  assignment; a wrong weight there changes the output's shape, not its values.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distnorm.tensor_parallel import (
    CRMSNorm,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
    SingleScaleRMSNorm,
)
from tests.compose.cases import CASES, Case

TP_NORMS = [SequenceParallelLayerNorm, SequenceParallelRMSNorm, ShardedLayerNorm, ShardedRMSNorm,
            SingleScaleRMSNorm, CRMSNorm]


@pytest.mark.parametrize("cls", TP_NORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [8, np.int64(8), np.int32(8), (8,), [8], torch.Size([8]), (np.int64(8),)],
                         ids=["int", "np.int64", "np.int32", "tuple", "list", "Size", "tuple_np"])
def test_normalized_shape_as_torch_takes_it(cls, shape):
    norm = cls(shape)
    assert norm.normalized_shape == nn.LayerNorm(shape).normalized_shape == (8,)  # type: ignore[arg-type]
    assert isinstance(norm.normalized_shape, tuple) and type(norm.normalized_shape[0]) is int
    assert norm(torch.randn(3, 8)).shape == (3, 8)


@pytest.mark.parametrize("cls", TP_NORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [0, -1, True, 8.0, "8"], ids=["zero", "negative", "bool", "float", "str"])
def test_normalized_shape_refused_with_its_value(cls, shape):
    with pytest.raises((ValueError, TypeError), match=rf"{cls.__name__}: normalized_shape .*{shape!r}".replace(
            "(", r"\(").replace(")", r"\)")):
        cls(shape)


@pytest.mark.parametrize("cls", TP_NORMS, ids=lambda c: c.__name__)
def test_several_normalized_dims_refused_or_exactly_as_torch(cls):
    """Either a clear refusal, or what nn.LayerNorm / nn.RMSNorm do with (4, 8): normalise over both dims."""
    try:
        norm = cls((4, 8))
    except (ValueError, TypeError) as exc:
        assert f"{cls.__name__}: normalized_shape" in str(exc) and "(4, 8)" in str(exc), str(exc)
        return
    assert norm.normalized_shape == (4, 8)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    y = norm(x)
    assert y.shape == x.shape
    torch_cls = {"SequenceParallelLayerNorm": nn.LayerNorm, "ShardedLayerNorm": nn.LayerNorm,
                 "SequenceParallelRMSNorm": nn.RMSNorm, "ShardedRMSNorm": nn.RMSNorm}.get(cls.__name__)
    if torch_cls is not None:
        ref = torch_cls((4, 8), eps=norm.eps)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)


def _norm_parameters(case: Case) -> list[tuple[str, nn.Module]]:
    """(name, owner) of every parameter a norm uses elementwise (linears' weights excluded, see above)."""
    module = case.build(None)
    owners = dict(module.named_modules())
    out = []
    for name, _ in module.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        if "Linear" not in type(owner).__name__:
            out.append(name)
    return out


PARAMS = [(c.name, p) for c in CASES for p in _norm_parameters(c)]


WRONG = ["larger", "broadcastable"]


def _wrong(p: torch.Tensor, how: str) -> torch.Tensor:
    """One element too many along dim 0, or a shape that broadcasts against the right one."""
    if how == "larger":
        shape = list(p.shape) or [1]
        shape[0] += 1
    else:  # [C] -> [1]; a one-element [1] -> a 0-d scalar
        shape = [1] * p.dim() if p.numel() > 1 else []
    return torch.full(shape, 1.5, dtype=p.dtype)


def _raises_naming(fn, name: str, bad: torch.Tensor) -> None:
    with pytest.raises((ValueError, RuntimeError)) as info:
        fn()
    msg = str(info.value)
    leaf = name.rpartition(".")[2].rpartition("_")[2]  # norm_weight is the fused op's "weight"
    shapes = (str(tuple(bad.shape)), str(list(bad.shape)))
    assert leaf in msg and any(s in msg for s in shapes), f"the error does not name {leaf!r} and its shape {shapes[0]}: {msg}"


@pytest.mark.parametrize("how", WRONG)
@pytest.mark.parametrize(("case_name", "param"), PARAMS, ids=[f"{c}.{p}" for c, p in PARAMS])
def test_wrong_shape_parameter_assigned_raises(case_name, param, how):
    from tests.compose.cases import BY_NAME

    case = BY_NAME[case_name]
    module = case.build(None)
    owner_name, _, leaf = param.rpartition(".")
    owner = module.get_submodule(owner_name)
    bad = _wrong(getattr(owner, leaf), how)
    setattr(owner, leaf, nn.Parameter(bad))
    _raises_naming(lambda: module(*case.inputs(0, 1, 0), **case.kwargs), param, bad)


@pytest.mark.parametrize("how", WRONG)
@pytest.mark.parametrize(("case_name", "param"), PARAMS, ids=[f"{c}.{p}" for c, p in PARAMS])
def test_wrong_shape_parameter_through_functional_call_raises(case_name, param, how):
    from tests.compose.cases import BY_NAME

    case = BY_NAME[case_name]
    module = case.build(None)
    bad = _wrong(module.get_parameter(param), how)
    _raises_naming(lambda: torch.func.functional_call(module, {param: bad}, case.inputs(0, 1, 0), case.kwargs),
                   param, bad)


@pytest.mark.parametrize("case_name", [c.name for c in CASES])
def test_wrong_shape_state_dict_is_refused(case_name):
    from tests.compose.cases import BY_NAME

    module = BY_NAME[case_name].build(None)
    state = module.state_dict()
    for key, value in state.items():
        if value.dim() == 0:
            continue
        bad = dict(state, **{key: _wrong(value, "larger")})
        with pytest.raises(RuntimeError, match=rf"size mismatch for {key}"):
            module.load_state_dict(bad)
