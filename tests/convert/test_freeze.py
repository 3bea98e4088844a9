"""freeze_norms / FrozenScaleNorm: the calibrated 1/σ against a float64 formula, pooled over simulated
worlds of 1-4 ranks (uneven and empty shards) and over real processes, with the collectives pinned;
then fold_norms removes every frozen norm that has a Linear next to it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm as dn
import distnorm.convert as C
from distnorm.comm import count_collectives, shard_offsets, shard_sizes
from distnorm.freeze import FrozenScaleNorm, freeze_norms
from distnorm.tensor_parallel import sync_sequence_parallel_grads
from distnorm.testing import simulate, spawn
from tests.convert._models import HF_MODELS, TOL, hidden, inputs, perturb, transformers
from tests.convert._pooled import H, batches, rows, spawned_freeze, two_norms

EXACT = 1e-12


def _hf_rms(cls: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        module = getattr(transformers.models, cls.lower())
        return getattr(getattr(module, f"modeling_{cls.lower()}"), f"{cls}RMSNorm")(H, eps=1e-6)

    return build


# name -> (factory, centred): every LayerNorm/RMSNorm flavour freeze_norms recognises
NORMS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "LayerNorm": (lambda: nn.LayerNorm(H), True),
    "LayerNorm[no bias]": (lambda: nn.LayerNorm(H, bias=False, eps=1e-3), True),
    "RMSNorm": (lambda: nn.RMSNorm(H, eps=1e-6), False),
    "RMSNorm[eps None]": (lambda: nn.RMSNorm(H), False),
    "SequenceParallelLayerNorm": (lambda: dn.SequenceParallelLayerNorm(H, zero_centered_gamma=True,
                                                                       output_scale=0.5), True),
    "SequenceParallelRMSNorm": (lambda: dn.SequenceParallelRMSNorm(H, output_scale=2.0), False),
    "SingleScaleRMSNorm": (lambda: dn.SingleScaleRMSNorm(H), False),
    "ShardedLayerNorm": (lambda: dn.ShardedLayerNorm(H), True),
    "ShardedRMSNorm": (lambda: dn.ShardedRMSNorm(H), False),
    "LlamaRMSNorm": (_hf_rms("Llama"), False),
    "GemmaRMSNorm": (_hf_rms("Gemma"), False),
}


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", eps) if eps is None else eps
    return torch.finfo(torch.float64).eps if eps is None else float(eps)


def _frozen_ref(x: torch.Tensor, norm: nn.Module, rstd: float, center: bool) -> torch.Tensor:
    """The frozen map written out in float64 from the original norm's parameters."""
    x = x.double()
    gamma = torch.ones(H, dtype=torch.float64) if getattr(norm, "weight", None) is None else norm.weight.double()
    if getattr(norm, "zero_centered_gamma", False) or "Gemma" in type(norm).__name__:
        gamma = gamma + 1.0
    y = (x - x.mean(-1, keepdim=True) if center else x) * rstd * gamma
    if getattr(norm, "bias", None) is not None:
        y = y + norm.bias.double()
    return y * float(getattr(norm, "output_scale", 1.0))


@pytest.mark.parametrize("layout", ["producer", "consumer"])
@pytest.mark.parametrize("name", list(NORMS))
def test_freeze_matches_the_float64_formula_and_folds_away(name: str, layout: str) -> None:
    """rstd = 1/sqrt(mean over every calibration token of var + eps) (mean x² for RMSNorm); the frozen
    model is γ(x - mean x)·rstd + β exactly; fold_norms then removes the frozen norm, folding it back into
    the Linear before it (``producer``) or into the one after it (``consumer``)."""
    factory, center = NORMS[name]
    norm = factory().double()
    fc_in = nn.Linear(4, H) if layout == "producer" else nn.Identity()
    model = perturb(nn.Sequential(fc_in, norm, nn.Linear(H, 3)).double())
    weight = getattr(norm, "weight", None)
    calib = batches([(5,), (3, 2)], last=4 if layout == "producer" else H)
    with torch.no_grad():
        seen = torch.cat([fc_in(b).reshape(-1, H) for b in calib])
    var = seen.var(-1, unbiased=False) if center else seen.pow(2).mean(-1)
    rstd = float((var + _eps(norm)).mean().rsqrt())
    ref_norm = copy.deepcopy(norm)

    assert freeze_norms(model, calib) is model
    frozen = model[1]
    assert isinstance(frozen, FrozenScaleNorm) and frozen.center == center and not frozen.training
    assert frozen.weight is weight  # the same Parameter object: an optimizer holding it trains on
    assert float(frozen.rstd) == pytest.approx(rstd, rel=EXACT)
    assert "1.rstd" in model.state_dict()  # saved with the model
    x = batches([(4,)], seed=5, last=calib[0].shape[-1])[0]
    with torch.no_grad():
        expected = model[2](_frozen_ref(fc_in(x), ref_norm, rstd, center))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=EXACT)

    head = model[2].weight.clone()
    C.fold_norms(model, x)
    assert isinstance(model[1], nn.Identity)
    assert torch.equal(model[2].weight, head) == (layout == "producer")  # folded back when it could be
    torch.testing.assert_close(model(x), expected, rtol=0, atol=EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [True, False])
def test_frozen_forward_low_precision_within_twice_torch_error(dtype: torch.dtype, center: bool) -> None:
    """Error vs the float64 map ≤ 2× the same-dtype F.layer_norm / F.rms_norm error vs its float64 value."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=g) * 3 + 1).to(dtype)
    gamma, beta = torch.randn(96, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    norm = FrozenScaleNorm(96, 0.37, center=center, bias=center, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(gamma)
        if center:
            norm.bias.copy_(beta)
    x64 = x.double()
    xc = x64 - x64.mean(-1, keepdim=True) if center else x64
    ref = xc * 0.37 * gamma.double() + (beta.double() if center else 0.0)
    got = norm(x)
    assert got.dtype == dtype
    if center:
        torch_err = (torch.nn.functional.layer_norm(x, (96,), gamma, beta).double()
                     - torch.nn.functional.layer_norm(x64, (96,), gamma.double(), beta.double())).abs().max()
    else:
        torch_err = (torch.nn.functional.rms_norm(x, (96,), gamma).double()
                     - torch.nn.functional.rms_norm(x64, (96,), gamma.double())).abs().max()
    assert float((got.detach().double() - ref).abs().max()) <= 2 * float(torch_err)


# ------------------------------------------------------------------------------------------------
# Pooled over ranks
# ------------------------------------------------------------------------------------------------


def _pooled_rank(rank: int, calib: list[torch.Tensor], x: torch.Tensor, grad_sync: str) -> tuple:
    world, group = dist.get_world_size(), dist.group.WORLD
    model = two_norms(group, grad_sync)
    with count_collectives() as counts:
        freeze_norms(model, [rows(b, world, rank) for b in calib], group=group)
    assert model.training and model.sp.training  # the training flags survive the eval-mode calibration
    model(rows(x, world, rank)).pow(2).sum().backward()
    if grad_sync == "deferred":
        sync_sequence_parallel_grads(model)
    return float(model.ln.rstd), float(model.sp.rstd), counts["all_reduce"], counts.bytes.get("all_reduce", 0), \
        model.sp.weight.grad.clone()


@pytest.mark.parametrize("world,grad_sync", [(1, "backward"), (2, "backward"), (3, "deferred"), (4, "backward")])
def test_calibration_pools_every_rank_in_one_all_reduce(world: int, grad_sync: str) -> None:
    """Rows split unevenly (4 ranks, 3 rows: one rank holds none): every rank gets the one-process rstd
    from exactly one all-reduce of 2 × (norms + 1) float64; the frozen sequence-parallel weight's
    gradient is then the full-batch one on every rank (synced in backward, or deferred)."""
    calib, x = batches([(7,), (3,), (6,)]), batches([(5,)], seed=9)[0]
    ref = two_norms(None)
    freeze_norms(ref, calib)
    ref(x).pow(2).sum().backward()
    for ln_rstd, sp_rstd, ar_count, ar_bytes, sp_grad in simulate(world, _pooled_rank, calib, x, grad_sync,
                                                                  timeout=60):
        assert ln_rstd == pytest.approx(float(ref.ln.rstd), rel=EXACT)
        assert sp_rstd == pytest.approx(float(ref.sp.rstd), rel=EXACT)
        assert (ar_count, ar_bytes) == ((1, 8 * 2 * 3) if world > 1 else (0, 0))
        torch.testing.assert_close(sp_grad, ref.sp.weight.grad, rtol=0, atol=1e-10)


def _sharded_rank(rank: int, x: torch.Tensor, calib: list[torch.Tensor]) -> tuple:
    world, group = dist.get_world_size(), dist.group.WORLD
    start, size = shard_offsets(7, world)[rank], shard_sizes(7, world)[rank]
    model = nn.Sequential(dn.ShardedLayerNorm(7, group=group), dn.ShardedRMSNorm(7, group=group)).double()
    with torch.no_grad():  # this rank's slice of the reference's parameters
        full = perturb(nn.Sequential(nn.LayerNorm(7), nn.RMSNorm(7, eps=1e-6)).double())
        model[0].weight.copy_(full[0].weight[start:start + size])
        model[0].bias.copy_(full[0].bias[start:start + size])
        model[1].weight.copy_(full[1].weight[start:start + size])
    with count_collectives() as calib_counts:
        freeze_norms(model, [b[..., start:start + size] for b in calib])
    x_shard = x[..., start:start + size].clone().requires_grad_()
    with count_collectives() as fwd_counts:
        y = model.train()(x_shard)
    with count_collectives() as bwd_counts:
        y.pow(3).sum().backward()
    counts = [(c["all_reduce"], c.bytes.get("all_reduce", 0)) for c in (calib_counts, fwd_counts, bwd_counts)]
    return [float(m.rstd) for m in model], y.detach(), x_shard.grad, model[0].weight.grad, counts


@pytest.mark.parametrize("world", [2, 3])
def test_hidden_sharded_norms_freeze_as_the_full_norm(world: int) -> None:
    """Hidden split 7 over 2 or 3 ranks: rstd, outputs and gradients (x, γ) are the full frozen norm's;
    calibration all-reduces [Σx, Σx²] per token per batch per norm (besides the norms' own forwards),
    the frozen LayerNorm's centring one number per token each way, the frozen RMSNorm nothing."""
    calib, x = batches([(5,), (2, 3)], last=7), batches([(4,)], seed=9, last=7)[0]
    ref = perturb(nn.Sequential(nn.LayerNorm(7), nn.RMSNorm(7, eps=1e-6)).double())
    freeze_norms(ref, calib)
    x_ref = x.clone().requires_grad_()
    y_ref = ref.train()(x_ref)
    y_ref.pow(3).sum().backward()
    results = simulate(world, _sharded_rank, x, calib, timeout=60)
    torch.testing.assert_close(torch.cat([r[1] for r in results], -1), y_ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([r[2] for r in results], -1), x_ref.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([r[3] for r in results], -1), ref[0].weight.grad, rtol=0, atol=1e-10)
    tokens = 5 + 6
    own = (2, (16 + 8) * tokens)  # the norms' own forwards (LayerNorm: Σx, Σx²; RMSNorm: Σx²) per batch
    for rstd, *_, counts in results:
        assert rstd == pytest.approx([float(m.rstd) for m in ref], rel=EXACT)
        assert counts == [(4 + own[0] * 2, 16 * 2 * tokens + own[1]), (1, 8 * 4), (1, 8 * 4)]


def test_calibration_pools_real_processes() -> None:
    ref = two_norms(None)
    freeze_norms(ref, batches([(7,), (3,)]))
    for got in spawn(2, spawned_freeze, timeout=120):
        assert got == pytest.approx([float(ref.ln.rstd), float(ref.sp.rstd)], rel=EXACT)


def _one_rank_empty(rank: int, calib: list[torch.Tensor]) -> float:
    model = two_norms(dist.group.WORLD)
    freeze_norms(model, calib if rank == 0 else [], group=dist.group.WORLD)
    return float(model.ln.rstd)


def test_a_rank_without_batches_takes_the_others_statistics() -> None:
    calib = batches([(4,), (3,)])
    ref = two_norms(None)
    freeze_norms(ref, calib)
    assert simulate(2, _one_rank_empty, calib, timeout=60) == pytest.approx([float(ref.ln.rstd)] * 2, rel=EXACT)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_frozen_hf_models_fold_every_norm_but_the_last(name: str) -> None:
    model = HF_MODELS[name]()
    freeze_norms(model, [inputs(name, seed=s) for s in (2, 3)])
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenScaleNorm)]
    assert frozen and not [m for m in model.modules() if C.norm_kind(m) in ("layer_norm", "rms_norm")]
    batch = inputs(name)
    ref = hidden(model, batch)
    C.fold_norms(model, batch)
    left = [n for n, m in model.named_modules() if isinstance(m, FrozenScaleNorm)]
    assert left == frozen[-1:]  # the final norm is the model's output: nothing to fold it into
    torch.testing.assert_close(hidden(model, batch), ref, rtol=0, atol=TOL["gpt2"])


def test_freeze_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"freeze_norms: model must be an nn\.Module, got int"):
        freeze_norms(3, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"found no LayerNorm/RMSNorm to freeze in Linear \(rank 0 of 1\)"):
        freeze_norms(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match=r"batches is empty on every rank; expected at least one"):
        freeze_norms(nn.Sequential(nn.LayerNorm(2)), [])

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.LayerNorm(2), nn.RMSNorm(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match=r"norm 'spare' \(RMSNorm\) saw no token in the calibration batches on any "
                                         r"rank; expected every norm to run \(rank 0 of 1\)"):
        freeze_norms(Unused(), [torch.zeros(3, 2)])
    for kwargs, match in (({"parallel": "tensor"}, r"parallel must be one of \('sequence', 'sharded'\), got 'tensor'"),
                          ({"rstd": 0.0}, r"rstd must be a finite float > 0, got 0.0"),
                          ({"grad_sync": "later"}, r"grad_sync must be one of \('backward', 'deferred'\), got 'later'")):
        with pytest.raises(ValueError, match=match):
            FrozenScaleNorm(4, **kwargs)
    with pytest.raises(ValueError, match=r"FrozenScaleNorm: x last dim must be normalized_shape = 4, got shape \(2, 3\)"):
        FrozenScaleNorm(4)(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"FrozenScaleNorm: x must be a floating-point tensor, got torch.int64"):
        FrozenScaleNorm(4)(torch.zeros(2, 4, dtype=torch.long))


FROZEN_FORMS: dict[str, dict[str, object]] = {
    "sequence": {}, "sharded": {"parallel": "sharded"}, "single_scale": {"single_scale": True},
    "single_scale[sharded]": {"single_scale": True, "parallel": "sharded"},
}


def _frozen_wrong_shapes(rank: int, world: int) -> dict[tuple[str, str, tuple[int, ...], str], str | None]:
    """Each form's weight / bias swapped for wrong shapes (through functional_call, and in a state
    dict): the error message, or None where nothing was raised."""
    group = dist.group.WORLD if world > 1 else None
    local = shard_sizes(10, world)[rank]
    out: dict[tuple[str, str, tuple[int, ...], str], str | None] = {}
    for form, kwargs in FROZEN_FORMS.items():
        norm = FrozenScaleNorm(10, 0.5, group=group, **kwargs)  # type: ignore[arg-type]
        width = local if kwargs.get("parallel") == "sharded" else 10
        x = torch.randn(3, width, generator=torch.Generator().manual_seed(rank))
        for name, p in norm.named_parameters():
            n = p.shape[0]
            for shape in {(1,), (), (n + 1,), (10,), (width,)} - {tuple(p.shape)}:
                bad = torch.full(shape, 1.5)
                for how in ("functional_call", "load_state_dict"):
                    try:
                        if how == "functional_call":
                            torch.func.functional_call(norm, {name: bad}, (x,))
                        else:
                            norm.load_state_dict(dict(norm.state_dict(), **{name: bad}))
                        out[form, name, shape, how] = None
                    except (ValueError, RuntimeError) as exc:
                        out[form, name, shape, how] = str(exc)
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_frozen_scale_norm_refuses_parameters_of_another_shape(world: int) -> None:
    """weight / bias of any shape but the one built (``(H,)``; this rank's ``(H_local,)`` sharded;
    ``(1,)`` single-scale) -- a broadcastable ``[1]`` or 0-d one, the full ``[H]`` on a shard --
    raise naming the parameter, its shape, the expected one and the rank (ValueError at the forward,
    RuntimeError from load_state_dict); none broadcasts."""
    import re

    for rank, errors in enumerate(simulate(world, _frozen_wrong_shapes, world, timeout=60)):
        local = shard_sizes(10, world)[rank]
        assert errors
        for (form, name, shape, how), msg in errors.items():
            expected = (1,) if form.startswith("single_scale") else (local,) if form == "sharded" else (10,)
            where = f"{form}.{name} of shape {shape} via {how}, rank {rank}: {msg}"
            if how == "functional_call":
                want = (rf"^FrozenScaleNorm: {name} has shape {re.escape(str(shape))}, expected "
                        rf"{re.escape(str(expected))} \(.*\) \(rank {rank} of {world}\)$")
            else:
                want = (rf"size mismatch for {name}: .*FrozenScaleNorm expects {re.escape(str(expected))} "
                        rf"\(.*\) \(rank {rank} of {world}\)")
            assert msg is not None and re.search(want, msg), where


def test_frozen_scale_norm_resets_every_buffer_after_meta_init() -> None:
    norm = FrozenScaleNorm(4, 0.25, zero_centered_gamma=True, device="meta")
    norm.to_empty(device="cpu")
    norm.reset_parameters()
    assert float(norm.rstd) == 0.25 and torch.equal(norm.weight, torch.zeros(4)) and torch.equal(norm.bias, torch.zeros(4))


def _outside_group(rank: int) -> str:
    model = nn.Sequential(dn.SequenceParallelLayerNorm(4, group=dist.group.WORLD))
    with pytest.raises(ValueError) as sp_error:
        freeze_norms(model, [torch.zeros(2, 4)])  # the tokens are split over WORLD, group=None pools nothing
    sharded = FrozenScaleNorm(4, parallel="sharded", group=dist.group.WORLD)
    with pytest.raises(ValueError, match=r"fold_scale_shift: a hidden-sharded norm holds only its 2 of 4 columns"):
        sharded.fold_scale_shift()
    return str(sp_error.value)


def test_sequence_parallel_group_outside_the_pooling_group_is_refused_on_every_rank() -> None:
    for rank, msg in enumerate(simulate(2, _outside_group, timeout=60)):
        assert msg == ("freeze_norms: norm '0' splits its tokens over a group of ranks [0, 1] that group=[0] does "
                       "not contain; pass the group spanning every calibration token (e.g. all ranks) "
                       "(rank 0 of 1)"), rank
