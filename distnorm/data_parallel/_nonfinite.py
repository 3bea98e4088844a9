"""Running statistics are never updated from a non-finite batch (unless ``allow_nonfinite_stats=True``).

A running-statistics norm registers the guard in its ``__init__`` (:func:`init_nonfinite_guard`) and
wraps its functional call in :func:`guard_running_stats`. In training:

* forward: the module's own buffers (running statistics, windows, step counters) are snapshotted;
  if the update turned any floating buffer that was finite into NaN/Inf, every buffer is put back
  with ``torch.where`` and ``num_nonfinite_skips`` (a non-persistent int64 buffer, so state dicts
  keep torch's keys) counts one skip;
* backward (``backward_buffers``, e.g. PowerNorm's ``ema_gz``): the same check around the autograd
  node that updates them, through a pre-hook (snapshot) and a post-hook (check) on the output's
  ``grad_fn``.

The output itself propagates NaN/Inf like torch (nothing is masked). The statistics deciding the
update are the all-reduced ones, so every rank of the group skips alike. No host sync: the decision
stays a device tensor. Cost per training step: one copy of the module's buffers and an
``isfinite`` reduction over them (a few ``C``-sized vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["guard_running_stats", "init_nonfinite_guard"]

SKIPS = "num_nonfinite_skips"


def init_nonfinite_guard(module: nn.Module, allow_nonfinite_stats: bool, device: torch.device | str | None) -> None:
    """Set ``module.allow_nonfinite_stats`` and register the ``num_nonfinite_skips`` counter (not persistent)."""
    module.allow_nonfinite_stats = bool(allow_nonfinite_stats)  # type: ignore[assignment]
    module.register_buffer(SKIPS, torch.zeros((), dtype=torch.long, device=device), persistent=False)


def _snapshot(buffers: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.clone()) for b in buffers]


def _restore_if_nonfinite_(snapshot: list[tuple[torch.Tensor, torch.Tensor]], skips: torch.Tensor) -> None:
    floats = [(b, old) for b, old in snapshot if b.is_floating_point()]
    if not floats:
        return
    # a buffer that was finite and is not any more: this batch's statistics were NaN/Inf
    spoiled = torch.stack([torch.isfinite(old).all() & ~torch.isfinite(b).all() for b, old in floats]).any()
    for b, old in snapshot:
        b.copy_(torch.where(spoiled, old, b))
    skips.add_(spoiled.to(skips.dtype))


def guard_running_stats(
    module: nn.Module, forward: Callable[[], torch.Tensor], *, backward_buffers: Sequence[str] = ()
) -> torch.Tensor:
    """Run ``forward()`` (which updates ``module``'s buffers in place) and undo a non-finite update."""
    if not module.training or getattr(module, "allow_nonfinite_stats", True):
        return forward()
    skips = getattr(module, SKIPS)
    own = [b for name, b in module.named_buffers(recurse=False) if name != SKIPS and name not in backward_buffers]
    snapshot = _snapshot(own)
    y = forward()
    _restore_if_nonfinite_(snapshot, skips)
    node = y.grad_fn
    if backward_buffers and node is not None:
        later = [getattr(module, name) for name in backward_buffers]
        held: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

        def before(grad_outputs: object) -> None:
            held.append(_snapshot(later))

        def after(grad_inputs: object, grad_outputs: object) -> None:
            if held:
                _restore_if_nonfinite_(held.pop(), skips)

        node.register_prehook(before)
        node.register_hook(after)
    return y
