"""Parity harness for the running-statistics norms: N ranks == one process on the whole batch.

Every step feeds each rank its slice of a global batch (uneven sizes, one rank empty for worlds
3 and 4, optional pad masks), runs forward + backward and records outputs, input gradients and
collectives; parameter gradients accumulate over the steps and are summed over ranks; buffers
(running statistics, ema_gz, step counters, skip counters) are compared after the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnorm.comm import count_collectives
from distnorm.testing import split_for_world

BATCH = 5
SIZES = {1: [5], 2: [3, 2], 3: [2, 0, 3], 4: [1, 2, 0, 2]}  # rank 1 (world 3) / 2 (world 4) empty

Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def make_steps(
    n_steps: int, channels: int, channel_dim: int, masked: bool, dtype: torch.dtype = torch.float64,
    seed: int = 0, spatial: int = 3, scales: list[float] | None = None,
) -> list[Step]:
    """Per step a global ``(x, dy, mask)``: ``[5, C, L]`` for channel_dim 1, ``[5, T, C]`` for -1."""
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, channels, spatial) if channel_dim == 1 else (BATCH, spatial, channels)
    steps: list[Step] = []
    for i in range(n_steps):
        offset = torch.randn(channels, generator=g, dtype=torch.float64).view([1, -1, 1] if channel_dim == 1 else [1, 1, -1])
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset) * (scales[i] if scales else 1.0)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        mask = None
        if masked:
            mask = torch.rand(BATCH, spatial, generator=g) > 0.3
            mask[0, 0] = True
        steps.append((x.to(dtype), dy.to(dtype), mask))
    return steps


def perturb_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Parameters off their init (ones/zeros hide bugs), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def run_rank(rank: int, world: int, build: Callable[..., nn.Module], kwargs: dict[str, Any],
             steps: list[Step], dtype: torch.dtype, train: bool = True) -> dict[str, Any]:
    group = dist.group.WORLD if world > 1 else None
    module = perturb_(build(group=group, **kwargs).to(dtype)).train(train)
    sizes = SIZES[world]
    ys, dxs, counts = [], [], []
    for x, dy, mask in steps:
        x_shard = split_for_world(x, world, sizes=sizes)[rank].clone().requires_grad_()
        dy_shard = split_for_world(dy, world, sizes=sizes)[rank]
        mask_shard = None if mask is None else split_for_world(mask, world, sizes=sizes)[rank]
        with count_collectives() as c:
            y = module(x_shard, mask=mask_shard)
            y.backward(dy_shard)
        ys.append(y.detach())
        dxs.append(x_shard.grad)
        counts.append((dict(c.counts), dict(c.bytes)))
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return {"ys": ys, "dxs": dxs, "counts": counts, "grads": grads, "buffers": buffers}


def gather(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate outputs and input grads, sum parameter grads; buffers must agree on every rank."""
    first = per_rank[0]
    for other in per_rank[1:]:
        for name, buf in first["buffers"].items():
            torch.testing.assert_close(other["buffers"][name], buf, rtol=0, atol=0, msg=f"buffer {name} differs across ranks")
    return {
        "ys": [torch.cat([r["ys"][i] for r in per_rank]) for i in range(len(first["ys"]))],
        "dxs": [torch.cat([r["dxs"][i] for r in per_rank]) for i in range(len(first["dxs"]))],
        "grads": {n: sum(r["grads"][n] for r in per_rank) for n in first["grads"]},
        "buffers": first["buffers"],
        "counts": [r["counts"] for r in per_rank],
    }


def assert_parity(actual: dict[str, Any], expected: dict[str, Any], atol: float, rtol: float = 0.0) -> None:
    """Outputs, input grads, summed parameter grads and buffers within ``atol + rtol * |expected|``."""
    for i, (y, y_ref) in enumerate(zip(actual["ys"], expected["ys"])):
        torch.testing.assert_close(y.double(), y_ref.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"step {i} output: {m}")
    for i, (dx, dx_ref) in enumerate(zip(actual["dxs"], expected["dxs"])):
        torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"step {i} dx: {m}")
    assert set(actual["grads"]) == set(expected["grads"])
    for name, g_ref in expected["grads"].items():
        torch.testing.assert_close(actual["grads"][name].double(), g_ref.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    for name, b_ref in expected["buffers"].items():
        b = actual["buffers"][name]
        torch.testing.assert_close(b.double(), b_ref.double().reshape(b.shape), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"buffer {name}: {m}")


def autograd_reference(
    steps: list[Step], params: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
    fn: Callable[[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor]],
                 tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> dict[str, Any]:
    """Run a differentiable float64 reference ``fn(x, mask, params, state) -> (y, state)`` over the steps."""
    leaves = {k: v.detach().double().clone().requires_grad_() for k, v in params.items()}
    ys, dxs = [], []
    for x, dy, mask in steps:
        x64 = x.detach().double().clone().requires_grad_()
        y, state = fn(x64, mask, leaves, state)
        y.backward(dy.double())
        ys.append(y.detach())
        dxs.append(x64.grad)
    return {"ys": ys, "dxs": dxs, "grads": {k: v.grad for k, v in leaves.items()}, "buffers": state}
