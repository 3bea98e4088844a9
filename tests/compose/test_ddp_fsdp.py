"""DDP and FSDP2 around distnorm models, in real gloo processes, equal one process on the whole batch.

* DP = 2 (one spawn): a ``Linear -> norm`` model per data-parallel / running-statistics norm,
  wrapped in ``DistributedDataParallel(process_group=topo.dp_group)`` and in FSDP2's
  ``fully_shard(mesh=topo.mesh["dp"])``; uneven local batches (3 and 2 samples).
* TP x DP = 2 x 2 (one spawn of 4): a sequence-parallel block (``SequenceParallelLayerNorm``,
  column/row-parallel linears, ``ShardedRMSNorm`` on the hidden-sharded activations; uneven token
  shards) under FSDP2 on the ``dp`` mesh axis and under DDP on the dp group.

Each rank's loss is ``sum(y_local * w_local)``: the wrappers' gradient *average* over DP is
``1 / dp_size`` times the gradient of ``sum(y * w)`` over the global batch, so the wrapped runs
step with ``dp_size`` times the learning rate and record ``dp_size`` times their gradients
(scaling the loss instead would scale the gradient statistics PowerNorm and UnifiedNorm keep in
their buffers). Three SGD steps; this rank's outputs,
the full gradients and values of its parameters (TP shards compared with the same slice of the
one-process tensors) and every buffer after every step must match the one-process run (float64:
only the reduction order differs).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm as dn
from distnorm.comm import Group, shard_offsets, shard_sizes
from distnorm.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    ShardedRMSNorm,
)
from distnorm.tensor_parallel.checkpoint import shard_layout
from distnorm.testing import spawn

ATOL = 1e-10
STEPS = 3
LR = 0.05
IN, C, L = 4, 6, 3
SAMPLES = 5  # DP = 2: 3 and 2 samples
H, FFN, TOKENS = 8, 12, 14  # TP x DP: 7 tokens per DP replica, 4 and 3 per TP rank
TIMEOUT = 240

NORMS: dict[str, Callable[[Group], nn.Module]] = {
    "SyncBatchNorm": lambda g: dn.SyncBatchNorm(C, group=g, channel_dim=-1),
    "AlphaBatchNorm": lambda g: dn.AlphaBatchNorm(C, group=g, channel_dim=-1),
    "PowerNorm": lambda g: dn.PowerNorm(C, warmup_iters=2, group=g),
    "UnifiedNorm": lambda g: dn.UnifiedNorm(C, window_size=2, warmup_iters=2, ratio_warmup_iters=1, group=g),
    "RepBatchNorm": lambda g: dn.RepBatchNorm(C, group=g),
    "ProgressiveRepBN": lambda g: dn.ProgressiveRepBN(C, warmup_steps=1, decay_steps=2, total_steps=4, group=g),
    "BatchChannelNorm": lambda g: dn.BatchChannelNorm(C, num_groups=2, group=g, channel_dim=-1),
    "EvoNormB0": lambda g: dn.EvoNormB0(C, group=g, channel_dim=-1),
    "EvoNormS0": lambda g: dn.EvoNormS0(C, groups=2, group=g, channel_dim=-1),
}
WRAPPERS = ("ddp", "fsdp2")
Record = dict[str, list[torch.Tensor]]
# (step) -> (output, cotangent, the rows of the output to record)
StepFn = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _randn(shape: tuple[int, ...], *key: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _part(t: torch.Tensor, world: int, rank: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s ``shard_sizes`` slice of ``t`` along ``dim``."""
    return t.narrow(dim, shard_offsets(t.shape[dim], world)[rank], shard_sizes(t.shape[dim], world)[rank])


def _wrap(model: nn.Module, how: str, topo: Any) -> nn.Module:
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model, process_group=topo.dp_group)
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=topo.mesh["dp"])


def _full(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return torch.zeros(())
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model: nn.Module, step_fn: StepFn, scale: float, view: Callable[[str, torch.Tensor], torch.Tensor]) -> Record:
    """STEPS SGD steps (learning rate ``scale * LR``) of ``sum(y * w)``: per step the recorded output rows,
    every parameter's full gradient (times ``scale``) and value (through ``view(name, tensor)``), every buffer."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=scale * LR)
    rec: Record = {"out": [], "grad": [], "param": [], "buffer": []}
    for step in range(STEPS):
        y, w, rows = step_fn(step)
        (y * w).sum().backward()
        opt.step()
        rec["out"].append(rows.detach().clone())
        named = sorted(inner.named_parameters())
        rec["grad"] += [view(n, scale * _full(p.grad)).detach().clone() for n, p in named]
        rec["param"] += [view(n, _full(p)).detach().clone() for n, p in named]
        rec["buffer"] += [b.detach().clone() for _, b in sorted(inner.named_buffers())]
        opt.zero_grad(set_to_none=True)
    return rec


def max_errors(got: Record, want: Record) -> dict[str, float]:
    errors = {}
    for key in want:
        pairs = list(zip(got[key], want[key], strict=True))
        bad_shape = any(g.shape != w.shape for g, w in pairs)
        errors[key] = float("inf") if bad_shape else max([(g - w).abs().max().item() for g, w in pairs if g.numel()]
                                                         or [0.0])
    return errors


def _same(name: str, t: torch.Tensor) -> torch.Tensor:
    return t


def _each_wrapper(topo: Any, make: Callable[[], nn.Module], step_fn: Callable[[nn.Module], StepFn], want: Record,
                  prefix: str) -> dict[str, Any]:
    """``make()`` under each wrapper vs ``want``: max errors per quantity, or the error text."""
    results: dict[str, Any] = {}
    for how in WRAPPERS:
        try:
            model = _wrap(make(), how, topo)
            results[f"{prefix}/{how}"] = max_errors(train(model, step_fn(model), float(topo.dp_size), _same), want)
            del model  # freed while the process group is alive (see docs/integration.md, DDP at exit)
        except Exception as exc:  # reported per case, the others still run
            results[f"{prefix}/{how}"] = f"{type(exc).__name__}: {exc}"
    return results


# --------------------------------------------------------------------------------------------
# DP = 2: every data-parallel norm under DDP and FSDP2
# --------------------------------------------------------------------------------------------


def _dp_model(name: str, group: Group) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, C), NORMS[name](group)).double()


def _dp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn((SAMPLES, L, IN), "x", step) * 1.5 + 0.5, _randn((SAMPLES, L, C), "w", step)


def _dp_rank(rank: int) -> dict[str, Any]:
    topo = dn.init_distributed()
    world, me = topo.dp_size, topo.dp_rank

    def ref_step(model: nn.Module) -> StepFn:  # one process, the whole batch; this rank's rows recorded
        def step_fn(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, w = _dp_batch(step)
            y = model(x)
            return y, w, _part(y, world, me)
        return step_fn

    def dp_step(model: nn.Module) -> StepFn:
        def step_fn(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, w = _dp_batch(step)
            y = model(_part(x, world, me))
            return y, _part(w, world, me), y
        return step_fn

    results: dict[str, Any] = {}
    for name in NORMS:
        ref = _dp_model(name, None)
        want = train(ref, ref_step(ref), 1.0, _same)
        results.update(_each_wrapper(topo, functools.partial(_dp_model, name, topo.dp_group), dp_step, want, name))
    return results


@functools.cache
def _dp_results() -> dict[str, Any]:
    per_rank = spawn(2, _dp_rank, timeout=TIMEOUT)
    return {key: [r[key] for r in per_rank] for key in per_rank[0]}


def _check(key: str, per_rank: list[Any]) -> None:
    for rank, errors in enumerate(per_rank):
        assert not isinstance(errors, str), f"{key}, rank {rank}: {errors}"
        bad = {k: v for k, v in errors.items() if not v <= ATOL}
        assert not bad, f"{key}, rank {rank}: max abs errors vs one process on the whole batch {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("how", WRAPPERS)
@pytest.mark.parametrize("name", NORMS)
def test_data_parallel_norm_under_wrapper_equals_one_process(name, how):
    key = f"{name}/{how}"
    _check(key, _dp_results()[key])


# --------------------------------------------------------------------------------------------
# TP x DP = 2 x 2: sequence-parallel and hidden-sharded norms under FSDP2 (and DDP)
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """``x + fc2(gelu(ShardedRMSNorm(fc1(SequenceParallelLayerNorm(x)))))`` on token-sharded ``x``."""

    def __init__(self, tp_group: Group) -> None:
        super().__init__()
        torch.manual_seed(0)  # the linears draw the full weights, then keep this rank's slice
        self.norm1 = SequenceParallelLayerNorm(H, group=tp_group, dtype=torch.float64)
        self.fc1 = ColumnParallelLinear(H, FFN, group=tp_group, sequence_parallel=True, dtype=torch.float64)
        self.norm2 = ShardedRMSNorm(FFN, group=tp_group, dtype=torch.float64)
        self.fc2 = RowParallelLinear(FFN, H, group=tp_group, sequence_parallel=True, dtype=torch.float64)

    def forward(self, x_shard: torch.Tensor, num_tokens: int) -> torch.Tensor:
        h = self.fc1(self.norm1(x_shard), num_tokens=num_tokens)  # [num_tokens, FFN / tp]
        return x_shard + self.fc2(F.gelu(self.norm2(h)))  # [tokens of this rank, H]


def _tokens(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn((TOKENS, H), "tok", step) * 2.0 + 0.3, _randn((TOKENS, H), "tok-w", step)


def _tp_dp_rank(rank: int) -> dict[str, Any]:
    topo = dn.init_distributed(tp=2)
    per_replica = shard_sizes(TOKENS, topo.dp_size)[topo.dp_rank]

    def mine(t: torch.Tensor) -> torch.Tensor:  # DP replica's tokens, then this TP rank's of those
        return _part(_part(t, topo.dp_size, topo.dp_rank), topo.tp_size, topo.tp_rank)

    def ref_step(model: nn.Module) -> StepFn:
        def step_fn(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, w = _tokens(step)
            y = model(x, TOKENS)
            return y, w, mine(y)
        return step_fn

    def tp_step(model: nn.Module) -> StepFn:
        def step_fn(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, w = _tokens(step)
            y = model(mine(x), per_replica)
            return y, mine(w), y
        return step_fn

    layout = shard_layout(Block(topo.tp_group))

    def tp_slice(name: str, t: torch.Tensor) -> torch.Tensor:  # the one-process tensor, as this TP rank holds it
        if name not in layout:
            return t
        dim, _, _ = layout[name]
        return _part(t, topo.tp_size, topo.tp_rank, dim)

    want = train((ref := Block(None)), ref_step(ref), 1.0, tp_slice)
    return _each_wrapper(topo, functools.partial(Block, topo.tp_group), tp_step, want, "tp_dp")


@pytest.mark.slow
def test_tensor_parallel_block_under_fsdp2_and_ddp_on_a_2x2_grid_equals_one_process():
    per_rank = spawn(4, _tp_dp_rank, timeout=TIMEOUT)
    for how in WRAPPERS:
        _check(f"tp_dp/{how}", [r[f"tp_dp/{how}"] for r in per_rank])
