"""convert_norms / fold_norms / pre_ln_to_pre_rmsnorm on tiny random Hugging Face models (no downloads), in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm.convert as C
from distnorm.comm import shard_offsets, shard_sizes
from distnorm.tensor_parallel import SequenceParallelLayerNorm, SequenceParallelRMSNorm, ShardedLayerNorm
from distnorm.testing import simulate, spawn
from tests.convert._models import HF_MODELS, TOL, gpt2, inputs, perturb

MODELS = {k: HF_MODELS[k] for k in ("gpt2", "llama", "vit")}
_perturb, _inputs = perturb, inputs


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_parallel_conversion_tp1_keeps_outputs(name: str) -> None:
    model, inputs = MODELS[name](), _inputs(name)
    ref = _out(model, inputs)
    converted = C.convert_norms(copy.deepcopy(model), C.to_sequence_parallel(None))
    kinds = {type(m) for m in converted.modules()}
    assert not any(C.norm_kind(m) in ("layer_norm", "rms_norm") for m in converted.modules())
    assert kinds & {SequenceParallelLayerNorm, SequenceParallelRMSNorm}
    torch.testing.assert_close(_out(converted, inputs), ref, rtol=0, atol=TOL[name])


def _sp_rank(rank: int, model: nn.Module, name: str, inputs: dict, weight: torch.Tensor) -> tuple:
    """This rank's rows of the batch through the converted model; norm grads are summed over the group."""
    group = torch.distributed.group.WORLD
    world = torch.distributed.get_world_size()
    rows = slice(shard_offsets(4, world)[rank], shard_offsets(4, world)[rank] + shard_sizes(4, world)[rank])
    local = C.convert_norms(copy.deepcopy(model), C.to_sequence_parallel(group))
    out = _out(local, {k: v[rows] for k, v in inputs.items()})
    (out * weight[rows]).sum().backward()
    grads = {n: p.grad.clone() for n, p in local.named_parameters() if "norm" in n or "ln_" in n}
    return out.detach(), grads


@pytest.mark.parametrize("world,name", [(1, "gpt2"), (2, "gpt2"), (3, "gpt2"), (4, "gpt2"), (3, "llama"),
                                        (2, "vit")])
def test_sequence_parallel_conversion_in_a_simulated_world(world: int, name: str) -> None:
    """Tokens split over ranks (by batch row, 4 rows: uneven for 3): outputs are the reference's rows and
    every norm's weight/bias gradient is the full-batch gradient on every rank."""
    model, inputs = MODELS[name](), _inputs(name)
    ref_model = copy.deepcopy(model)
    ref = _out(ref_model, inputs)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ref * weight).sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    results = simulate(world, _sp_rank, model, name, inputs, weight, timeout=120)
    torch.testing.assert_close(torch.cat([o for o, _ in results]), ref.detach(), rtol=0, atol=TOL[name])
    for _, grads in results:
        assert grads, "no norm parameters found"
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n].grad, rtol=0, atol=TOL[name] * 10, msg=n)


def _sharded_rank(rank: int, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    world = torch.distributed.get_world_size()
    norm = C.convert_norms(nn.Sequential(copy.deepcopy(ln)), C.to_sharded(torch.distributed.group.WORLD))[0]
    assert isinstance(norm, ShardedLayerNorm)
    start, size = shard_offsets(x.shape[-1], world)[rank], shard_sizes(x.shape[-1], world)[rank]
    return norm(x.narrow(-1, start, size)).detach()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_conversion_keeps_this_ranks_slice(world: int) -> None:
    ln = _perturb(nn.LayerNorm(10).double())
    x = torch.randn(5, 10, dtype=torch.float64)
    out = torch.cat(simulate(world, _sharded_rank, x, ln, timeout=60), dim=-1)
    torch.testing.assert_close(out, ln(x).detach(), rtol=0, atol=1e-12)


def _spawned_sequence_parallel(rank: int) -> float:
    torch.manual_seed(0)
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    norm = C.convert_norms(nn.Sequential(ln), C.to_sequence_parallel(torch.distributed.group.WORLD))[0]
    norm(x[rank * 2: rank * 2 + 2]).sum().backward()
    ref = nn.LayerNorm(6).double()
    ref.load_state_dict(ln.state_dict())
    ref(x).sum().backward()
    return float((norm.weight.grad - ref.weight.grad).abs().max())


def test_sequence_parallel_conversion_real_processes() -> None:
    assert max(spawn(2, _spawned_sequence_parallel, timeout=120)) <= 1e-12


def test_fold_batch_norm_into_linear_and_keep_hidden_uses() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model = _perturb(nn.Sequential(nn.Linear(4, 6), bn, nn.Linear(6, 3)).double())
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = model(x)
    C.fold_norms(model, x)
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)

    class Residual(nn.Module):  # the norm's output also feeds an add the hooks cannot see
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return h + self.fc(h)

    res = _perturb(Residual().double())
    x = torch.randn(3, 6, dtype=torch.float64)
    ref, w0 = res(x), res.ln.weight.clone()
    C.fold_norms(res, x)
    assert torch.equal(res.ln.weight, w0)  # left alone
    torch.testing.assert_close(res(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("head", [False, True])
def test_pre_ln_to_pre_rmsnorm_is_exact_for_gpt2(head: bool) -> None:
    model, inputs = gpt2(head), _inputs("gpt2")
    ref = model(**inputs)[0]
    converted = C.pre_ln_to_pre_rmsnorm(copy.deepcopy(model))
    body = getattr(converted, "transformer", converted)
    assert all(isinstance(b.ln_1, nn.RMSNorm) and isinstance(b.ln_2, nn.RMSNorm) for b in body.h)
    assert isinstance(body.ln_f, nn.RMSNorm if head else nn.LayerNorm)
    torch.testing.assert_close(converted(**inputs)[0], ref, rtol=0, atol=1e-10)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got int"):
        C.convert_norms(3, C.to_sequence_parallel(None))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory must be callable"):
        C.convert_norms(nn.Linear(2, 2), "sharded")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"factory returned str for LayerNorm"):
        C.convert_norms(nn.Sequential(nn.LayerNorm(2)), lambda m: "x" if isinstance(m, nn.LayerNorm) else None)
    with pytest.raises(ValueError, match="must be in eval mode"):
        C.fold_norms(nn.Sequential(nn.LayerNorm(2)).train(), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"expected a GPT-2-style model with \('wte'"):
        C.pre_ln_to_pre_rmsnorm(nn.Linear(2, 2))


def test_data_parallel_factories_need_their_module() -> None:
    try:
        import distnorm.data_parallel  # noqa: F401
    except ImportError:
        for factory in (C.to_sync_batch_norm, C.to_power_norm, C.to_unified_norm):
            with pytest.raises(RuntimeError, match=rf"{factory.__name__}: needs distnorm.data_parallel"):
                factory(None)
    else:
        model = nn.Sequential(nn.BatchNorm1d(4))
        assert type(C.convert_norms(model, C.to_sync_batch_norm(None))[0]).__name__ == "SyncBatchNorm"


def _sync_bn_rank(rank: int, bn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    world = torch.distributed.get_world_size()
    model = C.convert_norms(nn.Sequential(copy.deepcopy(bn)), C.to_sync_batch_norm(torch.distributed.group.WORLD))
    start, size = shard_offsets(x.shape[0], world)[rank], shard_sizes(x.shape[0], world)[rank]
    return model(x[start:start + size]).detach(), model[0].running_mean.clone()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sync_batch_norm_conversion_uses_the_whole_batch(world: int) -> None:
    pytest.importorskip("distnorm.data_parallel")
    bn = _perturb(nn.BatchNorm1d(5).double()).train()
    x = torch.randn(7, 5, dtype=torch.float64) * 3 + 1
    ref = copy.deepcopy(bn)
    expected = ref(x).detach()
    results = simulate(world, _sync_bn_rank, bn, x, timeout=60)
    torch.testing.assert_close(torch.cat([y for y, _ in results]), expected, rtol=0, atol=1e-10)
    for _, running_mean in results:
        torch.testing.assert_close(running_mean, ref.running_mean, rtol=0, atol=1e-12)
