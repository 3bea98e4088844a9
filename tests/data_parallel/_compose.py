"""Every data-parallel norm in a configuration whose state-dependent phases all happen within 4
training steps (warmup ends, windows fill, schedules decay), and a runner that trains a few
steps and records everything that must agree between two ways of running the same module."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from distnorm.data_parallel import (
    AlphaBatchNorm,
    BatchChannelNorm,
    EvoNormB0,
    EvoNormS0,
    PowerNorm,
    ProgressiveRepBN,
    RepBatchNorm,
    SyncBatchNorm,
    UnifiedNorm,
)
from distnorm.testing import split_for_world

C = 8
STEPS = 4

# name: (factory(**kw) -> module, per-rank input shape). The factories take group=, device=, dtype=.
NORMS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "SyncBatchNorm": (lambda **kw: SyncBatchNorm(C, **kw), (6, C, 5)),
    "SyncBatchNorm[btc,momentum=None]": (lambda **kw: SyncBatchNorm(C, momentum=None, channel_dim=-1, **kw), (6, 5, C)),
    "AlphaBatchNorm": (lambda **kw: AlphaBatchNorm(C, alpha=0.5, **kw), (6, C, 5)),
    "RepBatchNorm": (lambda **kw: RepBatchNorm(C, **kw), (6, 5, C)),
    "ProgressiveRepBN": (lambda **kw: ProgressiveRepBN(C, warmup_steps=1, decay_steps=2, total_steps=STEPS, **kw),
                         (6, 5, C)),
    "PowerNorm": (lambda **kw: PowerNorm(C, warmup_iters=2, group_num=2, **kw), (6, 5, C)),
    "UnifiedNorm": (lambda **kw: UnifiedNorm(C, window_size=2, warmup_iters=1, ratio_warmup_iters=2,
                                             outlier_filtration=True, **kw), (6, 5, C)),
    "BatchChannelNorm": (lambda **kw: BatchChannelNorm(C, num_groups=2, **kw), (6, C, 5)),
    "EvoNormB0": (lambda **kw: EvoNormB0(C, **kw), (6, C, 5)),
    "EvoNormS0": (lambda **kw: EvoNormS0(C, groups=2, **kw), (6, C, 5)),
}

# the norms whose training output depends on state they advance (the others only read the batch)
STATE_DEPENDENT = {"ProgressiveRepBN", "PowerNorm", "UnifiedNorm", "BatchChannelNorm"}


def build(name: str, group: Any = None, **kw: Any) -> nn.Module:
    """A fresh module with its parameters moved off their init (ones/zeros hide bugs), deterministically."""
    module = NORMS[name][0](group=group, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


def batches(name: str, world: int = 1, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global ``(x, dy)`` per step: ``world`` ranks' worth of samples, mean 1, std 2."""
    shape = NORMS[name][1]
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        x = torch.randn((shape[0] * world, *shape[1:]), generator=g) * 2 + 1
        out.append((x, torch.randn(x.shape, generator=g)))
    return out


def train(module: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], steps: list[tuple[torch.Tensor, torch.Tensor]],
          rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Train on this rank's slice of every step (forward via ``run``, backward, no optimizer), then
    one eval forward; returns every output, input gradient, accumulated parameter gradient and
    buffer (the non-persistent counters included), flattened in a fixed order."""
    record: list[torch.Tensor] = []
    module.train()
    for x_full, dy_full in steps:
        x = split_for_world(x_full, world)[rank].clone().requires_grad_()
        y = run(x)
        y.backward(split_for_world(dy_full, world)[rank])
        record += [y.detach(), x.grad]
    record += [p.grad for _, p in sorted(module.named_parameters())]
    record += [b.clone() for _, b in sorted(module.named_buffers())]
    module.eval()
    with torch.no_grad():
        record.append(run(split_for_world(steps[0][0], world)[rank]))
    return record


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True))


def world_group(world: int) -> Any:
    return dist.group.WORLD if world > 1 else None


def save_sums(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """A selective-checkpoint policy that caches ops the norms themselves issue, recomputes the rest."""
    saved = (torch.ops.aten.mm.default, torch.ops.aten.sum.dim_IntList)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


KINDS = ["nonreentrant", "reentrant", "selective"]


def region(module: nn.Module, kind: str, call: Callable[[torch.Tensor], torch.Tensor] | None = None
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call`` (default ``module``) inside a region with ops before and after it, checkpointed as
    ``kind`` ("none" or one of :data:`KINDS`) while ``module`` trains."""
    fn = module if call is None else call

    def body(t: torch.Tensor) -> torch.Tensor:
        return fn(t * 1.5 + 0.25) * 2

    # preserve_rng_state=False: nothing here draws random numbers, and restoring the global CPU RNG in a
    # recompute would reseed the other simulated ranks (threads) mid-draw
    def run(t: torch.Tensor) -> torch.Tensor:
        if kind == "none" or not module.training:  # eval: nothing to checkpoint
            return body(t)
        if kind == "selective":
            context = functools.partial(create_selective_checkpoint_contexts, save_sums)
            return checkpoint(body, t, use_reentrant=False, context_fn=context, preserve_rng_state=False)
        return checkpoint(body, t, use_reentrant=kind == "reentrant", preserve_rng_state=False)

    return run
