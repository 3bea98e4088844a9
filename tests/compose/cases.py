"""Every public distnorm module and functional op as one *case*: how to build it fresh, and what each
rank feeds it at each training step. Shared by the compile, checkpointing and meta-init matrices.

A case builds a fresh module from a group (``None`` at world 1) with deterministic, perturbed
parameters (ones/zeros hide bugs), and gives rank ``r`` of a world of ``P`` its inputs for step
``s``: floating inputs are activations (their gradients are checked), the rest pass through.
Shapes follow each op's contract: sequence-parallel norms get ``shard_sizes(T, P)[r]`` tokens,
hidden-sharded ones ``shard_sizes(H, P)[r]`` columns of every token, data-parallel norms an uneven
local batch. Functional ops are wrapped in a small module that holds their parameters and state.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import distnorm as dn
from distnorm.comm import Group, group_rank, group_size, shard_sizes
from distnorm.data_parallel.sync_batch_norm import sync_batch_norm
from distnorm.functional.layer_norm import layer_norm, rms_norm
from distnorm.functional.power_norm import group_scaling
from distnorm.overlap import ParallelMLPBlock, TokenSplitPlan, TokenWeaver, fused_allreduce_rms_norm
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
from tests.data_parallel._literature import perturb_  # parameters off their init, alike everywhere

H = 10  # hidden: over 4 ranks 3, 3, 2, 2 columns
FFN = 12
T = 7  # tokens: over 4 ranks 2, 2, 2, 1
C = 6  # channels of the data-parallel norms
L = 3  # spatial / sequence extent of their inputs
BATCH = {1: [4], 2: [3, 2], 3: [2, 1, 2], 4: [2, 1, 2, 1]}  # uneven local batches
DTYPE = torch.float32

Inputs = tuple[Any, ...]


@dataclass(frozen=True)
class Case:
    """One public module or functional op under test."""

    name: str
    family: str  # "tp" (tensor-parallel group), "dp" (data-parallel group) or "overlap"
    make: Callable[[Group], nn.Module]  # the constructor call (random inits draw from the global RNG)
    inputs: Callable[[int, int, int], Inputs]  # (rank, world, step) -> forward args
    kwargs: dict[str, Any] = field(default_factory=dict)  # forward keyword arguments
    stateful: bool = False  # buffers that advance in training (running statistics, step counters)

    def build(self, group: Group) -> nn.Module:
        return build(self, group)


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))  # hash() differs across processes


def _randn(shape: tuple[int, ...], *key: object, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(*key), dtype=torch.float64) * scale + offset).to(DTYPE)


# --------------------------------------------------------------------------------------------
# Inputs per layout
# --------------------------------------------------------------------------------------------


def tokens_sharded(name: str, width: int = H) -> Callable[[int, int, int], Inputs]:
    """This rank's ``shard_sizes(T, P)`` tokens of a global ``[T, width]``."""

    def inputs(rank: int, world: int, step: int) -> Inputs:
        full = _randn((T, width), name, step, scale=1.5, offset=0.5)
        return (full.split(shard_sizes(T, world))[rank],)

    return inputs


def hidden_sharded(name: str, width: int = H) -> Callable[[int, int, int], Inputs]:
    """This rank's ``shard_sizes(width, P)`` columns of every token of a global ``[T, width]``."""

    def inputs(rank: int, world: int, step: int) -> Inputs:
        full = _randn((T, width), name, step, scale=1.5, offset=0.5)
        return (full.split(shard_sizes(width, world), dim=-1)[rank],)

    return inputs


def replicated(name: str, width: int = H) -> Callable[[int, int, int], Inputs]:
    def inputs(rank: int, world: int, step: int) -> Inputs:
        return (_randn((T, width), name, step),)

    return inputs


def local_batch(name: str, channel_dim: int) -> Callable[[int, int, int], Inputs]:
    """An uneven local batch ``[B_r, C, L]`` (channel_dim 1) or ``[B_r, L, C]`` (channel_dim -1)."""

    def inputs(rank: int, world: int, step: int) -> Inputs:
        b = BATCH[world][rank]
        shape = (b, C, L) if channel_dim == 1 else (b, L, C)
        return (_randn(shape, name, world, rank, step, scale=1.5, offset=0.3),)

    return inputs


def masked_batch(name: str) -> Callable[[int, int, int], Inputs]:
    """``[B_r, L, C]`` and a bool pad mask ``[B_r, L]`` (True = real token)."""

    def inputs(rank: int, world: int, step: int) -> Inputs:
        (x,) = local_batch(name, -1)(rank, world, step)
        mask = torch.rand(x.shape[:2], generator=_gen(name, "mask", world, rank, step)) > 0.3
        mask[0, 0] = True
        return x, mask

    return inputs


# --------------------------------------------------------------------------------------------
# Functional ops as modules
# --------------------------------------------------------------------------------------------


class FunctionalNorm(nn.Module):
    """``dn.functional.layer_norm`` / ``rms_norm`` on hidden-sharded input, parameters held here."""

    def __init__(self, group: Group, rms: bool) -> None:
        super().__init__()
        self.group, self.rms = group, rms
        local = shard_sizes(H, group_size(group))[group_rank(group)]
        self.weight = nn.Parameter(torch.empty(local))
        self.bias = None if rms else nn.Parameter(torch.empty(local))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return rms_norm(x, self.weight, 1e-6, group=self.group, hidden=H)
        return layer_norm(x, self.weight, self.bias, 1e-5, group=self.group, hidden=H)


class FunctionalSyncBatchNorm(nn.Module):
    """``distnorm.data_parallel.sync_batch_norm`` with its parameters and running statistics."""

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(C))
        self.bias = nn.Parameter(torch.empty(C))
        self.register_buffer("running_mean", torch.empty(C))
        self.register_buffer("running_var", torch.empty(C))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        nn.init.zeros_(self.running_mean)
        nn.init.ones_(self.running_var)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # the functional op is the training-mode half; eval is torch's
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)
        return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, momentum=0.1, eps=1e-5,
                               group=self.group, channel_dim=1)


class FunctionalGroupScaling(nn.Module):
    """``dn.functional.power_norm.group_scaling``: local, no parameters, no state."""

    def __init__(self, group: Group) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_scaling(x, 2, channel_dim=-1)


class FusedAllreduceRMSNorm(nn.Module):
    """``dn.fused_allreduce_rms_norm`` with its weight held here; returns ``normed + residual_out``."""

    def __init__(self, group: Group, mode: str) -> None:
        super().__init__()
        self.group, self.mode = group, mode
        self.weight = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, partial: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_allreduce_rms_norm(partial, residual, self.weight, 1e-6, group=self.group,
                                        mode=self.mode)  # type: ignore[arg-type]


def _fused_inputs(mode: str) -> Callable[[int, int, int], Inputs]:
    def inputs(rank: int, world: int, step: int) -> Inputs:
        partial = _randn((T, H), "fused", rank, step)
        residual = _randn((T, H), "fused-res", step)
        if mode == "reduce_scatter":
            residual = residual.split(shard_sizes(T, world))[rank]
        return partial, residual

    return inputs


def _block_inputs(mode: str) -> Callable[[int, int, int], Inputs]:
    def inputs(rank: int, world: int, step: int) -> Inputs:
        x = _randn((T, H), "block", step)
        residual = _randn((T, H), "block-res", step)
        if mode == "reduce_scatter":
            residual = residual.split(shard_sizes(T, world))[rank]
        return x, residual

    return inputs


def _weaver(group: Group, mode: str = "allreduce") -> nn.Module:
    """Two blocks on two halves (allreduce mode), or on three chunks in reduce_scatter mode with the
    minimum-byte ``normed_grad="partial"`` convention."""
    normed_grad = "replicated" if mode == "allreduce" else "partial"
    blocks = [ParallelMLPBlock(H, FFN, group=group, normed_grad=normed_grad) for _ in range(2)]  # type: ignore[arg-type]
    plan = TokenSplitPlan(num_tokens=T, first=4) if mode == "allreduce" else TokenSplitPlan(
        num_tokens=T, first=3, chunks=(3, 2, 2))
    return TokenWeaver(blocks, group, plan, mode=mode, normed_grad=normed_grad)  # type: ignore[arg-type]


_RNG_LOCK = threading.Lock()  # simulated ranks are threads sharing the global RNG


def build(case: Case, group: Group) -> nn.Module:
    """A fresh module of ``case``: the global RNG seeded first (the same init on every rank), then perturbed."""
    with _RNG_LOCK:
        torch.manual_seed(0)
        module = case.make(group)
    return perturb_(module)


CASES: list[Case] = [
    # tensor parallel: sequence-parallel (token-sharded) and hidden-sharded norms, variants, linears
    Case("SequenceParallelLayerNorm", "tp", lambda g: SequenceParallelLayerNorm(H, group=g), tokens_sharded("spln")),
    Case("SequenceParallelRMSNorm", "tp", lambda g: SequenceParallelRMSNorm(H, group=g), tokens_sharded("sprms")),
    Case("ShardedLayerNorm", "tp", lambda g: ShardedLayerNorm(H, group=g), hidden_sharded("shln")),
    Case("ShardedRMSNorm", "tp", lambda g: ShardedRMSNorm(H, group=g), hidden_sharded("shrms")),
    Case("SingleScaleRMSNorm", "tp", lambda g: SingleScaleRMSNorm(H, group=g), tokens_sharded("ss")),
    Case("SingleScaleRMSNorm[sharded]", "tp", lambda g: SingleScaleRMSNorm(H, parallel="sharded", group=g),
          hidden_sharded("ss-sh")),
    Case("CRMSNorm", "tp", lambda g: CRMSNorm(H, group=g), tokens_sharded("crms")),
    Case("FrozenScaleNorm", "tp", lambda g: dn.FrozenScaleNorm(H, rstd=0.7, group=g), tokens_sharded("fsn")),
    Case("FrozenScaleNorm[sharded]", "tp", lambda g: dn.FrozenScaleNorm(H, rstd=0.7, parallel="sharded", group=g),
         hidden_sharded("fsn-sh")),
    Case("CRMSNorm[sharded]", "tp", lambda g: CRMSNorm(H, parallel="sharded", group=g), hidden_sharded("crms-sh")),
    Case("ColumnParallelLinear", "tp", lambda g: ColumnParallelLinear(H, FFN, group=g),
          replicated("col")),
    Case("ColumnParallelLinear[sequence_parallel]", "tp",
          lambda g: ColumnParallelLinear(H, FFN, group=g, sequence_parallel=True),
          tokens_sharded("col-sp"), kwargs={"num_tokens": T}),
    Case("RowParallelLinear", "tp", lambda g: RowParallelLinear(FFN, H, group=g),
          hidden_sharded("row", FFN)),
    Case("RowParallelLinear[sequence_parallel]", "tp",
          lambda g: RowParallelLinear(FFN, H, group=g, sequence_parallel=True),
          hidden_sharded("row-sp", FFN)),
    Case("RowParallelLinear[partial]", "tp",
          lambda g: RowParallelLinear(FFN, H, group=g, reduce_output=False),
          hidden_sharded("row-partial", FFN)),
    Case("functional.layer_norm", "tp", lambda g: FunctionalNorm(g, rms=False), hidden_sharded("f-ln")),
    Case("functional.rms_norm", "tp", lambda g: FunctionalNorm(g, rms=True), hidden_sharded("f-rms")),
    # overlap
    Case("fused_allreduce_rms_norm[allreduce]", "overlap", lambda g: FusedAllreduceRMSNorm(g, "allreduce"),
          _fused_inputs("allreduce")),
    Case("fused_allreduce_rms_norm[reduce_scatter]", "overlap", lambda g: FusedAllreduceRMSNorm(g, "reduce_scatter"),
          _fused_inputs("reduce_scatter")),
    Case("ParallelMLPBlock", "overlap", lambda g: ParallelMLPBlock(H, FFN, group=g), _block_inputs("allreduce")),
    Case("ParallelMLPBlock[reduce_scatter]", "overlap", lambda g: ParallelMLPBlock(H, FFN, group=g),
          _block_inputs("reduce_scatter"),
          kwargs={"mode": "reduce_scatter"}),
    Case("TokenWeaver", "overlap", _weaver, _block_inputs("allreduce")),
    Case("TokenWeaver[reduce_scatter]", "overlap", lambda g: _weaver(g, "reduce_scatter"),
         _block_inputs("reduce_scatter")),
    # data parallel and the running-statistics norms of the literature
    Case("SyncBatchNorm", "dp", lambda g: dn.SyncBatchNorm(C, group=g), local_batch("sbn", 1), stateful=True),
    Case("SyncBatchNorm[mask]", "dp", lambda g: dn.SyncBatchNorm(C, group=g, channel_dim=-1), masked_batch("sbn-m"),
          stateful=True),
    Case("AlphaBatchNorm", "dp", lambda g: dn.AlphaBatchNorm(C, group=g), local_batch("abn", 1), stateful=True),
    Case("PowerNorm", "dp", lambda g: dn.PowerNorm(C, warmup_iters=2, group=g), local_batch("pn", -1), stateful=True),
    Case("PowerNorm[mask]", "dp", lambda g: dn.PowerNorm(C, warmup_iters=2, group_num=2, group=g),
          masked_batch("pn-m"), stateful=True),
    Case("UnifiedNorm", "dp",
          lambda g: dn.UnifiedNorm(C, window_size=2, warmup_iters=2, ratio_warmup_iters=1, outlier_filtration=True,
                                   group=g),
          local_batch("un", -1), stateful=True),
    Case("RepBatchNorm", "dp", lambda g: dn.RepBatchNorm(C, group=g), local_batch("rbn", -1), stateful=True),
    Case("ProgressiveRepBN", "dp",
          lambda g: dn.ProgressiveRepBN(C, warmup_steps=1, decay_steps=2, total_steps=4, group=g),
          local_batch("prbn", -1), stateful=True),
    Case("BatchChannelNorm", "dp", lambda g: dn.BatchChannelNorm(C, num_groups=2, group=g), local_batch("bcn", 1),
          stateful=True),
    Case("EvoNormB0", "dp", lambda g: dn.EvoNormB0(C, group=g), local_batch("evb0", 1), stateful=True),
    Case("EvoNormS0", "dp", lambda g: dn.EvoNormS0(C, groups=2, group=g), local_batch("evs0", 1)),
    Case("functional.sync_batch_norm", "dp", FunctionalSyncBatchNorm, local_batch("f-sbn", 1), stateful=True),
    Case("functional.group_scaling", "dp", FunctionalGroupScaling, local_batch("f-gs", -1)),
]

BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def public_module_names() -> set[str]:
    """Every ``nn.Module`` class with a ``forward`` exported by ``distnorm`` and its ``tensor_parallel``,
    ``data_parallel`` and ``overlap`` packages (bases without a forward are not modules to run)."""
    from distnorm import data_parallel, overlap, tensor_parallel

    names = set()
    for mod in (dn, tensor_parallel, data_parallel, overlap):
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.forward is not nn.Module.forward:
                names.add(name)
    return names


def module_class_names() -> set[str]:
    """Names of the public ``nn.Module`` classes that some case builds (for the coverage check)."""
    built = set()
    for case in CASES:
        for m in case.build(None).modules():
            built.add(type(m).__name__)
    return built
