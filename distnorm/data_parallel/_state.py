"""Training state that advances exactly once per step: under activation checkpointing, torch.compile
and non-finite batches.

Running statistics, step counters and windows advance in the training forward, as in
``nn.BatchNorm``. Three things can make that go wrong, and this module is the one place that
handles them for every norm of :mod:`distnorm.data_parallel`:

* **Activation checkpointing** recomputes the forward inside the backward. A recomputation must
  neither advance the state a second time (``nn.BatchNorm`` does) nor read the state the first
  forward already advanced (PowerNorm, UnifiedNorm, ProgressiveRepBN and BatchChannelNorm read it).
  A forward that runs inside a backward (``torch._C._current_graph_task_id() != -1``: checkpoint's
  recomputation, reentrant or not, selective or not) is a recomputation: it advances nothing, and a
  norm whose output depends on its state uses the values its first forward read. Those were
  stashed by the first forward when it could be recomputed later (it ran under saved-tensor
  hooks — non-reentrant/selective checkpoint — or without gradients — reentrant checkpoint). If
  a recomputation finds no stashed state or more than one (several forwards of the module await
  their backward: pipeline schedules, a module used twice in one checkpointed region) it raises a
  RuntimeError: an exact answer is impossible, a wrong one is never given.
* **torch.compile** traces the forward once (the stash is not used there). In-place buffer updates
  compile as input mutations; every state value the backward needs is read through one
  ``torch.cat`` (:func:`~distnorm.functional._norm_utils.pack_state`), which the partitioner never
  recomputes, so the compiled backward does not see the updated buffers. Checkpointing inside a
  compiled region is recomputed by the compiler from the same graph: exact too. (An eager
  checkpoint around an already compiled norm re-runs the compiled forward: keep torch.compile
  outside the checkpoint.)
* **Non-finite batches**: the update goes through :func:`~distnorm.functional._norm_utils.commit_`,
  which keeps every buffer as it was when a finite one would turn NaN/Inf and counts the skip in
  ``num_nonfinite_skips`` (non-persistent, so state dicts keep torch's keys), unless
  ``allow_nonfinite_stats=True``. No host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distnorm.functional._norm_utils import pack_state, rank_of

__all__ = ["GRAD_SKIPS", "SKIPS", "advances", "init_state", "read_state", "recomputing", "skips_of"]

SKIPS = "num_nonfinite_skips"
GRAD_SKIPS = "num_nonfinite_grad_skips"  # backward-updated statistics (PowerNorm's, UnifiedNorm's ema_gz)
_STASH = "_distnorm_recompute_stash"
_STASH_LIMIT = 8  # forwards that were never recomputed (e.g. under CPU offload hooks) age out


def init_state(module: nn.Module, allow_nonfinite_stats: bool, device: torch.device | str | None,
               backward_stats: bool = False) -> None:
    """Set ``module.allow_nonfinite_stats`` and register the skip counters (not persistent).

    ``num_nonfinite_skips`` counts skipped forward updates; with ``backward_stats`` (statistics of
    the gradients, updated in the backward) ``num_nonfinite_grad_skips`` counts skipped backward
    updates. Two counters, because a buffer updated in both the forward and the backward graph
    trips torch.compile's partitioner.
    """
    module.allow_nonfinite_stats = bool(allow_nonfinite_stats)  # type: ignore[assignment]
    for name in (SKIPS, GRAD_SKIPS) if backward_stats else (SKIPS,):
        module.register_buffer(name, torch.zeros((), dtype=torch.long, device=device), persistent=False)


def skips_of(module: nn.Module, name: str = SKIPS) -> torch.Tensor | None:
    """The skip counter ``name`` when the non-finite guard is on, else None (updates go through unguarded)."""
    return None if getattr(module, "allow_nonfinite_stats", True) else getattr(module, name)


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing's recomputation.

    Always False under torch.compile, which recomputes from its own graph.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def advances(module: nn.Module) -> bool:
    """Whether this forward advances ``module``'s state: training, and not a recomputation."""
    return module.training and not recomputing()


def _may_be_recomputed() -> bool:
    # non-reentrant (and selective) checkpoint runs the first forward under its saved-tensor hooks;
    # reentrant checkpoint runs it without gradients
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None or not torch.is_grad_enabled()


def read_state(module: nn.Module, names: Sequence[str]) -> tuple[torch.Tensor, bool]:
    """The state ``module``'s training forward reads, as one float64 vector, and whether to advance it.

    Returns ``(packed, fresh)``: ``packed`` = :func:`pack_state` of the named buffers as this step's
    first forward saw them; ``fresh`` is False for a recomputation, which must not advance anything.
    """
    buffers = [getattr(module, n) for n in names]
    if torch.compiler.is_compiling():
        return pack_state(buffers), True
    stash: list[torch.Tensor] = module.__dict__.setdefault(_STASH, [])
    if recomputing():
        if len(stash) != 1:
            raise RuntimeError(_ambiguous(module, len(stash)))
        return stash.pop(), False
    packed = pack_state(buffers)
    if _may_be_recomputed():
        stash.append(packed)
        del stash[:-_STASH_LIMIT]
    else:
        stash.clear()  # a plain forward with gradients: nothing earlier will be recomputed now
    return packed, True


def _ambiguous(module: nn.Module, pending: int) -> str:
    cls = type(module).__name__
    if pending == 0:
        why = ("its first forward recorded no state to recompute from (it ran with gradients and outside "
               "torch.utils.checkpoint, or under torch.compile inside an eager checkpoint)")
    else:
        why = (f"{pending} forwards of it await their backward (several forwards before one backward, the module "
               f"used twice in one checkpointed region, or training-mode forwards without backward), so the "
               f"state the recomputed one read cannot be told apart")
    return (f"{cls}: activation checkpointing recomputes this module's training forward, but {why}; the "
            f"recomputation would not be exact. Run backward after each forward, keep this module out of the "
            f"checkpointed region, or compile the checkpointed model with torch.compile (rank {rank_of(None)})")
