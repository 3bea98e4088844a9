"""Run a case for a few training steps and an eval step, record everything, compare two runs.

A *run* is 3 training steps (forward, a fixed random cotangent, backward, SGD update) and one
eval forward + backward, from a fresh module. It records, per step, the outputs, the gradients of
the floating inputs, the parameter gradients and every buffer after the step. Two runs of the same
case (eager vs compiled, plain vs checkpointed) must agree on all of it.
"""

from __future__ import annotations

import traceback
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.compose.cases import BY_NAME, Case

STEPS = 3
LR = 0.01  # small enough that no case's training diverges (a diverging run amplifies round-off)
Record = dict[str, list[torch.Tensor]]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)]


def _cotangent(t: torch.Tensor, *key: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


def run(case: Case, module: nn.Module, forward: Callable[..., Any], rank: int, world: int,
        *, steps: int = STEPS) -> Record:
    """``steps`` training steps then one eval step of ``forward`` (``module`` or a wrapper of it)."""
    rec: Record = {"out": [], "input_grad": [], "param_grad": [], "buffer": []}
    params = [p for _, p in sorted(module.named_parameters())]
    for step in range(steps + 1):
        training = step < steps
        module.train(training)
        inputs = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in case.inputs(rank, world, step if training else 0)]
        outs = _tensors(forward(*inputs, **case.kwargs))
        loss = sum((o * _cotangent(o, case.name, step, i)).sum() for i, o in enumerate(outs))
        loss.backward()  # type: ignore[union-attr]
        rec["out"] += [o.detach().clone() for o in outs]
        rec["input_grad"] += [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.grad is not None]
        rec["param_grad"] += [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        with torch.no_grad():
            for p in params:
                if p.grad is not None and training:
                    p.sub_(LR * p.grad)
                p.grad = None
        rec["buffer"] += [b.detach().clone() for _, b in sorted(module.named_buffers())]
    return rec


def max_errors(got: Record, want: Record) -> dict[str, float]:
    """Largest ``|got - want| / max(1, |want|_max)`` per category (absolute for values of order 1, relative
    for larger ones); inf when the structure (count, shape, dtype) differs."""
    errors = {}
    for key, ws in want.items():
        gs = got[key]
        if len(gs) != len(ws) or any(g.shape != w.shape or g.dtype != w.dtype for g, w in zip(gs, ws, strict=True)):
            errors[key] = float("inf")
            continue
        errors[key] = max([((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1.0)).item()
                           for g, w in zip(gs, ws, strict=True) if g.numel()] or [0.0])
    return errors


def compile_case(case: Case, group: Any, rank: int, world: int, backend: str | Callable[..., Any],
                 checkpoint: str | None = None) -> dict[str, Any]:
    """Eager vs ``torch.compile(fullgraph=True)`` of ``case``: graph breaks, graphs, max errors or the error.

    With ``checkpoint`` (one of :data:`CHECKPOINT_MODES`) the compiled function calls the module
    through ``torch.utils.checkpoint`` (torchtitan's per-block AC + compile), still against plain eager.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    inductor_config.compile_threads = 1  # no compile-worker pool: faster on 2 shared cores
    torch._dynamo.reset()
    counters.clear()
    result: dict[str, Any] = {"name": case.name, "world": world, "backend": getattr(backend, "__name__", backend),
                              "checkpoint": checkpoint}
    try:
        eager = run(case, (m := case.build(group)), m, rank, world)
        module = case.build(group)
        cnt = CompileCounterWithBackend(backend)
        compiled = torch.compile(module if checkpoint is None else checkpointed(module, checkpoint),
                                 backend=cnt, fullgraph=True)
        got = run(case, module, compiled, rank, world)
        result.update(errors=max_errors(got, eager), graphs=cnt.frame_count,
                      graph_breaks=sum(counters["graph_break"].values()))
    except Exception as exc:  # reported per case; the matrix goes on
        result["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}\n{traceback.format_exc()[-2500:]}"
    return result


def compile_matrix(rank: int, names: list[str], backends: dict[str, str],
                   checkpointed_names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every case in ``names``, then every one in ``checkpointed_names`` compiled around non-reentrant
    checkpointing, on the world's group (``spawn`` target): one result per case, in that order."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    group = dist.group.WORLD if world > 1 else None
    torch.set_num_threads(1)
    return ([compile_case(BY_NAME[n], group, rank, world, backends.get(n, "aot_eager")) for n in names]
            + [compile_case(BY_NAME[n], group, rank, world, "aot_eager", checkpoint="non_reentrant")
               for n in checkpointed_names])


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------

CHECKPOINT_MODES = ("non_reentrant", "reentrant", "selective")


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing policy: keep matmul outputs, recompute everything else (norms included)."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(module: nn.Module, mode: str) -> Callable[..., Any]:
    """``module`` called through ``torch.utils.checkpoint`` in ``mode`` (one of :data:`CHECKPOINT_MODES`)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    # No module here draws random numbers, and preserve_rng_state=True would restore the *global* CPU RNG in
    # the recompute: in `simulate` (ranks are threads) that reseeds another rank mid-way through building its
    # next module, whose linears draw their init from the global RNG (a flaky, wrong-weights test failure).
    def call(*args: Any, **kwargs: Any) -> Any:
        fn = functools.partial(module, **kwargs)
        if mode == "reentrant":
            return checkpoint(fn, *args, use_reentrant=True, preserve_rng_state=False)
        if mode == "selective":
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls))
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)

    return call


def checkpoint_case(rank: int, name: str) -> dict[str, Any]:
    """``simulate``/``spawn`` target: the plain run vs each checkpointing mode; max errors (or the error) per mode."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    group = dist.group.WORLD if world > 1 else None
    case = BY_NAME[name]
    want = run(case, (m := case.build(group)), m, rank, world)
    result: dict[str, Any] = {}
    for mode in CHECKPOINT_MODES:
        module = case.build(group)
        try:
            result[mode] = max_errors(run(case, module, checkpointed(module, mode), rank, world), want)
        except Exception as exc:  # reported per mode
            result[mode] = f"{type(exc).__name__}: {exc}"
    return result
