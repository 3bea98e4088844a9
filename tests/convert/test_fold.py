"""fold_norms both ways: per-channel eval norms into the producing Linear/Conv (the Conv–BN fold), and
into consuming Linears otherwise; float64 outputs unchanged, and folds that would change them refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm as dn
import distnorm.convert as C
from distnorm.freeze import FrozenScaleNorm
from tests.convert._models import HF_MODELS, TOL, hidden, inputs, perturb

EXACT = 1e-12  # float64 folds: a few ulps of the outputs' magnitude (they are O(1))


def _fold_counting_runs(model: nn.Module, x: torch.Tensor) -> int:
    """fold_norms(model, x); returns how many times it ran the model (1: the hooked run, +1 per fold tried)."""
    runs = []
    handle = model.register_forward_pre_hook(lambda *_: runs.append(1))
    C.fold_norms(model, x)
    handle.remove()
    return len(runs)


def _norms_left(model: nn.Module) -> list[str]:
    """Per-channel norms still in the model (a folded one is an nn.Identity)."""
    kinds = (nn.modules.batchnorm._BatchNorm, dn.PowerNorm, dn.UnifiedNorm, dn.RepBatchNorm, dn.ProgressiveRepBN,
             FrozenScaleNorm)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _batch_norm(kind: str, c: int, dims: int) -> nn.Module:
    if kind == "torch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c)
    if kind == "torch_sync":
        return nn.SyncBatchNorm(c)
    if kind == "alpha1":  # alpha = 1: eval uses the running statistics only, a fixed affine map
        return dn.AlphaBatchNorm(c, alpha=1.0)
    return dn.SyncBatchNorm(c)


def cnn(kind: str) -> nn.Sequential:
    """Conv–BN–ReLU stacks over every conv flavour: padding modes, groups, no bias, transposed, 1-D/3-D."""
    def bn(c: int, dims: int = 2) -> nn.Module:
        return _batch_norm(kind, c, dims)

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), bn(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), bn(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", groups=8), bn(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), bn(6), nn.ReLU(),
        nn.Conv2d(6, 4, 1, padding=1, padding_mode="replicate"), bn(4), nn.ReLU(),
        nn.Unflatten(1, (2, 2)),
        nn.Conv3d(2, 4, (1, 3, 3), bias=False), bn(4, 3), nn.ReLU(),
        nn.Flatten(2),
        nn.Conv1d(4, 5, 3), bn(5, 1), nn.ReLU(),
        nn.ConvTranspose1d(5, 3, 3, bias=False), bn(3, 1),
    ).double()


@pytest.mark.parametrize("kind", ["torch", "torch_sync", "dn_sync", "alpha1"])
def test_conv_bn_relu_stacks_fold_into_their_convs(kind: str) -> None:
    model = perturb(cnn(kind))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = model(x)
    convs = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    C.fold_norms(model, x)
    assert _norms_left(model) == []
    assert all(not torch.equal(model.get_submodule(n).weight, w) for n, w in convs.items())  # folded *back*
    torch.testing.assert_close(model(x), ref, rtol=0, atol=EXACT)


@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_bn_relu_mlp_folds_into_its_linears(channels_last: bool) -> None:
    """[N, C] with BatchNorm1d, or [B, T, C] with distnorm's SyncBatchNorm(channel_dim=-1)."""
    def bn(c: int) -> nn.Module:
        return dn.SyncBatchNorm(c, channel_dim=-1) if channels_last else nn.BatchNorm1d(c)

    model = perturb(nn.Sequential(nn.Linear(5, 7), bn(7), nn.ReLU(), nn.Linear(7, 6, bias=False), bn(6), nn.ReLU(),
                                  nn.Linear(6, 3), bn(3)).double())
    x = torch.randn(*((4, 3) if channels_last else (4,)), 5, dtype=torch.float64)
    ref = model(x)
    C.fold_norms(model, x)
    assert _norms_left(model) == []
    assert model[3].bias is not None  # created by the fold
    torch.testing.assert_close(model(x), ref, rtol=0, atol=EXACT)


@pytest.mark.parametrize("cls", ["PowerNorm", "UnifiedNorm", "RepBatchNorm", "ProgressiveRepBN"])
def test_running_statistics_norms_fold_into_the_producing_linear(cls: str) -> None:
    extra = {"decay_steps": 2, "total_steps": 3} if cls == "ProgressiveRepBN" else {}
    norm = getattr(dn, cls)(6, channel_dim=-1, **extra).double()
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.ReLU()).double()
    for _ in range(3):  # move the running statistics away from their initial values
        model(torch.randn(8, 4, dtype=torch.float64) * 2).sum().backward()
    perturb(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = model(x)
    C.fold_norms(model, x)
    assert _norms_left(model) == []
    # fold_scale_shift() returns float32 (scale, shift) by contract: float32 round-off, not float64's
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "gpt2", "llama", "vit"])
def test_hf_models_fold_where_possible(name: str) -> None:
    """ResNet: every Conv–BN folds away. GPT-2/Llama/ViT: every block norm folds into its projections
    (γ, β move; the normalisation stays); the final norm, the model's output, cannot."""
    model, batch = HF_MODELS[name](), inputs(name)
    ref = hidden(model, batch)
    C.fold_norms(model, batch)
    torch.testing.assert_close(hidden(model, batch), ref, rtol=0, atol=TOL[name])
    assert _norms_left(model) == []
    norms = [m for m in model.modules() if C.norm_kind(m) in ("layer_norm", "rms_norm")]
    neutral = [m for m in norms if torch.equal(m.weight, torch.ones_like(m.weight))]
    assert len(neutral) == len(norms) - 1 if norms else name == "resnet"


class _Branches(nn.Module):
    """Producers whose outputs also go elsewhere, visibly (a second module) or not (a residual add)."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        self.shared = shared
        self.conv, self.bn, self.side = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        y = torch.relu(self.bn(h))
        if self.shared == "module":
            return y + self.side(h)
        if self.shared == "residual":
            return y + h
        return y + self.conv(x)  # "twice": the producer runs twice (the second output feeds no module)


@pytest.mark.parametrize("shared", ["module", "residual", "twice"])
def test_producer_that_feeds_something_else_is_not_folded_backwards(shared: str) -> None:
    model = perturb(_Branches(shared).double())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref, w = model(x), model.conv.weight.clone()
    # only the residual add is invisible to the hooks: that fold is tried, seen to change the outputs, undone
    assert _fold_counting_runs(model, x) == (2 if shared == "residual" else 1)
    assert isinstance(model.bn, nn.BatchNorm2d)  # its consumer is a ReLU: no forward fold either
    assert torch.equal(model.conv.weight, w)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_fold_falls_back_to_the_consumers() -> None:
    """A producer shared with another module: the BatchNorm folds into the Linear after it instead."""
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.head, self.side = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.head(self.bn(h)) + self.side(h)

    model = perturb(Model().double())
    x = torch.randn(5, 4, dtype=torch.float64)
    ref, w = model(x), model.fc.weight.clone()
    C.fold_norms(model, x)
    assert isinstance(model.bn, nn.Identity) and torch.equal(model.fc.weight, w)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=EXACT)


def test_channel_dim_and_tied_weights_are_respected() -> None:
    """BatchNorm1d on [B, T, C] normalises dim 1 (T), not the Linear's features: no fold either way.
    A producer whose weight is tied to another module's is left alone."""
    mismatch = perturb(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 5)).double())
    x = torch.randn(2, 5, 4, dtype=torch.float64)  # Linear -> [2, 5, 5]: BN channel dim 1 has 5 too
    ref = mismatch(x)
    assert _fold_counting_runs(mismatch, x) == 1  # refused up front, not by the output check
    assert isinstance(mismatch[1], nn.BatchNorm1d)
    torch.testing.assert_close(mismatch(x), ref, rtol=0, atol=0)

    tied = perturb(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4)).double())
    tied[3].weight = tied[0].weight
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = tied(x)
    assert _fold_counting_runs(tied, x) == 1
    assert isinstance(tied[1], nn.BatchNorm1d)
    torch.testing.assert_close(tied(x), ref, rtol=0, atol=0)

    class TiedConsumer(nn.Module):  # BN -> fc, whose weight `side` also uses on the raw input
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc, self.side = nn.BatchNorm1d(4), nn.Linear(4, 2), nn.Linear(4, 2)
            self.side.weight = self.fc.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x)) + self.side(x)

    consumer = perturb(TiedConsumer().double())
    ref = consumer(x)
    assert _fold_counting_runs(consumer, x) == 1
    assert isinstance(consumer.bn, nn.BatchNorm1d)
    torch.testing.assert_close(consumer(x), ref, rtol=0, atol=0)


def test_norms_that_are_not_fixed_affine_maps_stay() -> None:
    """AlphaBatchNorm(alpha < 1) mixes in the test batch, PowerNorm with GroupScaling scales per token,
    BatchNorm without running statistics uses the batch: none is an affine map of its input."""
    x = torch.randn(6, 4, dtype=torch.float64)
    for norm in (dn.AlphaBatchNorm(6, alpha=0.5), dn.PowerNorm(6, channel_dim=-1, group_num=2),
                 nn.BatchNorm1d(6, track_running_stats=False)):
        model = perturb(nn.Sequential(nn.Linear(4, 6), norm.double(), nn.Linear(6, 2)).double())
        ref = model(x)
        assert _fold_counting_runs(model, x) < 2, type(norm).__name__  # no fold tried
        assert model[1] is norm, type(norm).__name__
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_folded_norm_accepts_a_mask_argument() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(4, 6), dn.SyncBatchNorm(6, channel_dim=-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.norm(self.fc(x), mask=None))

    model = perturb(Masked().double())
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    ref = model(x)
    C.fold_norms(model, x)
    assert isinstance(model.norm, nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=EXACT)


def test_fold_into_parallel_linears() -> None:
    """At TP = 1 the parallel linears are plain ones: a BatchNorm folds back into a RowParallelLinear
    and a LayerNorm forwards into a ColumnParallelLinear (the demo model's layout)."""
    g = torch.Generator().manual_seed(0)
    model = perturb(nn.Sequential(dn.RowParallelLinear(4, 6, generator=g), dn.SyncBatchNorm(6, channel_dim=-1),
                                  nn.LayerNorm(6), dn.ColumnParallelLinear(6, 3, generator=g)).double())
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = model(x)
    C.fold_norms(model, x)
    assert isinstance(model[1], nn.Identity)
    assert torch.equal(model[2].weight, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=EXACT)


def test_fold_leaves_the_input_model_usable_after_a_refused_fold() -> None:
    """Undo restores a bias the fold had to create (None again), bit for bit."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.bn(h) + h  # the residual use makes the backward fold wrong

    model = perturb(Residual().double())
    before = copy.deepcopy(model.state_dict())
    C.fold_norms(model, torch.randn(3, 4, dtype=torch.float64))
    assert model.fc.bias is None and isinstance(model.bn, nn.BatchNorm1d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
