"""Running a stack of tensor-parallel blocks on token chunks, by :mod:`~distnorm.overlap.schedule`.

:class:`WeaveRun` executes the schedule's events for one forward (and, when recorded, its
backward); :class:`ChunkLayout` says which tokens each chunk holds. The public face is
:class:`distnorm.overlap.TokenWeaver`.

The woven backward. Autograd runs a graph's backward in an order of its own choosing, and
collectives inside it block, so a backward through the plain graph cannot overlap one chunk's
collectives with another's compute. When gradients are wanted (and the code is not being
compiled) the forward therefore *records* pieces instead: each block's ``partial(x)`` and each
fused add + RMSNorm becomes a separate small graph whose inputs are fresh leaves, no autograd
edge crosses a collective, and one ``torch.autograd.Function`` (:class:`_WovenStackFn`) stands
for the whole stack. Its backward walks the pieces by the backward schedule, taking each piece's
gradient with ``torch.autograd.grad`` and issuing the collectives between pieces itself,
asynchronously, through the same launcher as the forward. Parameter gradients come back as the
Function's outputs (summed over chunks in float32, cast once), so DDP/FSDP hooks and
``torch.autograd.grad`` see ordinary gradients. Not supported: a second backward through the same
forward (``retain_graph``) and double backward.

When the forward may be run again (:func:`can_weave` is False) nothing is recorded and the
backward is autograd's through the forward's graph. Under non-reentrant and selective activation
checkpointing (and any other saved-tensor hooks) that is what keeps the gradients exact: the
checkpoint recomputes its region once per backward *call*, and every ``torch.autograd.grad`` of a
woven backward is one (the whole stack recomputed per piece, its forward collectives re-issued
each time, and under selective checkpointing an error, "Trying to backward an extra time").
Reentrant checkpointing runs the forward without grad, then again, with grad and no hooks, inside
the backward: that second forward records and its backward is woven.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from distnorm.comm import Group, PendingCollective, shard_offsets, shard_sizes
from distnorm.overlap.fused import CollectiveLauncher, FusedNormCall, norm_weight
from distnorm.overlap.schedule import chain, interleave

__all__ = ["ChunkLayout", "WeaveBlock", "WeaveRun", "can_weave"]


def can_weave() -> bool:
    """Whether a forward run now may record pieces for a woven backward: grad mode on, not being
    compiled (the compiler differentiates the graph it captured), and no saved-tensor hooks active
    (``torch.utils.checkpoint`` with ``use_reentrant=False``, selective checkpointing, offloading
    such as ``torch.autograd.graph.save_on_cpu``): a region under hooks may be recomputed, once
    per backward call, and the woven backward makes one call per piece."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    # the hooks torch.utils.checkpoint pushes; the query AOTAutograd makes (torch has no public one)
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is None


class WeaveBlock(Protocol):
    """What :class:`~distnorm.overlap.TokenWeaver` needs of a block: ``partial(x) -> [T, H]``
    row-parallel partial sums (no collective in forward), the RMSNorm that follows it
    (``norm_weight [H]`` or None, ``eps``), and optionally ``normed_grad`` (default
    ``"replicated"``): the gradient ``partial`` hands back for ``x`` -- ``"replicated"`` (already
    all-reduced: e.g. a ``ColumnParallelLinear`` with ``copy_to_group``) or ``"partial"`` (this
    rank's part only)."""

    norm_weight: torch.Tensor | None
    eps: float

    def partial(self, x: torch.Tensor) -> torch.Tensor: ...


class ChunkLayout:
    """Which tokens each chunk holds, for ``num_tokens`` tokens split into ``chunk_tokens``.

    allreduce mode: chunk c is a contiguous range of the batch (x and residual alike).
    reduce_scatter mode: the residual is token-sharded (rank r holds ``shard_sizes(T, P)[r]``
    rows, contiguous), so chunks split *every rank's shard*: chunk c holds, of rank r's shard, rows
    ``[start[c][r], start[c][r] + rows[c][r])`` with ``start[c] = shard_sizes(n_0 + ... +
    n_{c-1}, P)``. The residual then splits locally, no token changes rank, and a chunk's ``x``
    (every token, replicated) is its rows gathered rank by rank. ``rows[c]`` are the per-rank
    sizes of chunk c's reduce-scatter and all-gather.
    """

    def __init__(self, mode: str, num_tokens: int, chunk_tokens: Sequence[int], world: int, rank: int) -> None:
        self.mode, self.world, self.rank = mode, world, rank
        self.chunk_tokens, self.count = list(chunk_tokens), len(chunk_tokens)
        bounds = [[0] * world] + [shard_sizes(m, world) for m in itertools.accumulate(chunk_tokens)]
        self.start = bounds[:-1]
        self.rows = [[b[r] - a[r] for r in range(world)] for a, b in itertools.pairwise(bounds)]
        self.offsets = shard_offsets(num_tokens, world)

    @property
    def _contiguous(self) -> bool:
        return self.mode == "allreduce" or self.world == 1

    def sizes(self, c: int) -> list[int] | None:
        """Per-rank token counts of chunk ``c``'s reduce-scatter / all-gather (None: allreduce mode)."""
        return None if self.mode == "allreduce" else self.rows[c]

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``[T, H]`` (every token) -> one ``[n_c, H]`` per chunk."""
        if self.count == 1:
            return [t]
        if self._contiguous:
            return list(t.split(self.chunk_tokens))
        return [torch.cat([t.narrow(0, self.offsets[r] + self.start[c][r], self.rows[c][r]) for r in range(self.world)])
                for c in range(self.count)]

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        if self.count == 1:
            return parts[0]
        if self._contiguous:
            return torch.cat(list(parts))
        return torch.cat([parts[c].narrow(0, sum(self.rows[c][:r]), self.rows[c][r])
                          for r in range(self.world) for c in range(self.count)])

    def split_residual(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The residual as the mode holds it (allreduce: every token; reduce_scatter: this rank's shard)."""
        if self.mode == "allreduce" or self.count == 1:
            return self.split(t)
        return list(t.split([self.rows[c][self.rank] for c in range(self.count)]))

    def join_residual(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.mode == "allreduce" or self.count == 1:
            return self.join(parts)
        return torch.cat(list(parts))


class WeaveRun:
    """One forward of ``blocks`` on the chunks of ``layout`` by the static schedule, and (when
    ``record``) its woven backward. Inputs are validated by the caller."""

    def __init__(self, blocks: Sequence[nn.Module], *, group: Group, launcher: CollectiveLauncher | None,
                 layout: ChunkLayout, mode: str, normed_grad: str, unfused: bool, record: bool,
                 params: Sequence[nn.Parameter] = ()) -> None:
        self.blocks = cast(list[WeaveBlock], list(blocks))
        self.group, self.launcher, self.layout, self.mode = group, launcher, layout, mode
        self.normed_grad, self.unfused, self.record = normed_grad, unfused, record
        self.params = list(params)
        wanted = {id(p) for p in self.params}
        # per block, the parameters of ``partial`` whose gradients are wanted (the norm weight aside)
        self.block_params = [[p for p in b.parameters() if id(p) in wanted and p is not getattr(b, "norm_weight", None)]
                             for b in blocks]
        count = layout.count
        self.calls: list[list[FusedNormCall]] = [[None] * count for _ in self.blocks]  # type: ignore[list-item]
        self.inputs: list[list[torch.Tensor]] = [[None] * count for _ in self.blocks]  # type: ignore[list-item]
        self.partials: list[list[torch.Tensor]] = [[None] * count for _ in self.blocks]  # type: ignore[list-item]
        self.weights: dict[int, torch.Tensor | None] = {}
        # reduce_scatter mode normalises 1/P of the tokens here: the weight gradient needs a sum
        self._weight_grad_is_partial = mode == "reduce_scatter" and launcher is not None and launcher.world > 1

    def _weight(self, i: int) -> torch.Tensor | None:
        # one upcast (and, reduce_scatter mode, one gradient all-reduce) per block, shared by chunks
        if i not in self.weights:
            weight = self.blocks[i].norm_weight
            group = self.group if self.launcher is not None else None
            self.weights[i] = norm_weight(weight, group, self.mode, record=self.record)
        return self.weights[i]

    # ----------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` replicated, residual as the mode holds it -> ``(normed [T, H], residual_out)``."""
        layout, count = self.layout, self.layout.count
        xs, res = layout.split(x), layout.split_residual(residual)
        calls: list[FusedNormCall] = [None] * count  # type: ignore[list-item]
        partials: list[tuple[int, torch.Tensor]] = [None] * count  # type: ignore[list-item]
        steps = chain(self.mode, len(self.blocks))
        for event, c, k in interleave(steps, count):
            if event == "work":
                for what, i in steps[k].work:
                    if what == "compute":
                        x_in = xs[c].detach().requires_grad_() if self.record else xs[c]
                        partials[c] = i, self.blocks[i].partial(x_in)
                        if self.record:
                            self.inputs[i][c], self.partials[i][c] = x_in, partials[c][1]
                    else:
                        res[c] = calls[c].norm()
                        if self.mode == "allreduce":
                            xs[c] = calls[c].finish()
            elif event == "issue" and steps[k].collective == "all_gather":
                calls[c].issue_gather()
            elif event == "issue":
                i, p = partials[c]
                calls[c] = FusedNormCall(p, res[c], self._weight(i), self.blocks[i].eps, group=self.group,
                                         mode=self.mode, launcher=self.launcher, normed_grad=self.normed_grad,
                                         sizes=layout.sizes(c), unfused=self.unfused, record=self.record)
                calls[c].issue()
                self.calls[i][c] = calls[c]
            elif event == "wait" and steps[k].collective == "all_gather":
                xs[c] = calls[c].finish()
            elif event == "wait":
                calls[c].wait()
        return layout.join(xs), layout.join_residual(res)

    # ----------------------------------------------------------------------------------------
    # woven backward (record=True)
    # ----------------------------------------------------------------------------------------

    def _issue(self, kind: str, t: torch.Tensor, c: int) -> PendingCollective:
        if self.launcher is None:
            return PendingCollective.done(t)
        if kind == "all_reduce":
            return self.launcher.all_reduce(t)
        sizes = self.layout.sizes(c)
        assert sizes is not None
        if kind == "reduce_scatter":
            return self.launcher.reduce_scatter(t, sizes)
        return self.launcher.all_gather(t, sizes)

    def backward(self, d_normed: torch.Tensor, d_residual_out: torch.Tensor, *,
                 need_dx: bool) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor | None]]:
        """Gradients of ``(x, residual, *params)`` from those of ``(normed, residual_out)``."""
        layout, count = self.layout, self.layout.count
        d_x = layout.split(d_normed)  # gradient of each chunk's current normed activations
        d_res = layout.split_residual(d_residual_out)
        d_h: list[torch.Tensor] = [None] * count  # type: ignore[list-item]
        d_y: list[torch.Tensor] = [None] * count  # type: ignore[list-item]
        pending: list[PendingCollective] = [None] * count  # type: ignore[list-item]
        grads: dict[int, torch.Tensor] = {}
        d_weight: dict[int, Any] = {}

        def accumulate(param: torch.Tensor, g: torch.Tensor | None) -> None:
            if g is not None:
                g = g.to(torch.promote_types(param.dtype, torch.float32))
                grads[id(param)] = grads[id(param)] + g if id(param) in grads else g

        steps = chain(self.mode, len(self.blocks), backward=True, normed_grad=self.normed_grad)
        for event, c, k in interleave(steps, count):
            kind = steps[k].collective
            if event == "wait":
                if kind == "all_gather":
                    d_h[c] = pending[c].wait()
                else:
                    d_y[c] = pending[c].wait()
            elif event == "issue":
                pending[c] = self._issue(kind, d_h[c] if kind == "all_gather" else d_x[c], c)  # type: ignore[arg-type]
            elif event == "work":
                for what, i in steps[k].work:
                    if what == "norm_bwd":
                        d_h[c], d_res[c], d_w = self._norm_bwd(self.calls[i][c], d_y[c], d_x[c], d_res[c])
                        if d_w is not None:
                            d_weight[i] = d_w if i not in d_weight else d_weight[i] + d_w
                    else:
                        want_x = i > 0 or need_dx
                        inputs = ([self.inputs[i][c]] if want_x else []) + self.block_params[i]
                        if not inputs:
                            continue
                        out = torch.autograd.grad(self.partials[i][c], inputs, d_h[c], allow_unused=True)
                        if want_x:
                            d_x[c] = torch.zeros_like(self.inputs[i][c]) if out[0] is None else out[0]
                        for p, g in zip(self.block_params[i], out[int(want_x):], strict=True):
                            accumulate(p, g)
            else:  # the round is over: every chunk's share of block i's weight gradient is in
                for what, i in steps[k].work:
                    if what == "norm_bwd" and i in d_weight and self._weight_grad_is_partial:
                        d_weight[i] = self._issue("all_reduce", d_weight[i], 0)
        for i, d_w in d_weight.items():
            weight = self.blocks[i].norm_weight
            assert weight is not None
            accumulate(weight, d_w.wait() if isinstance(d_w, PendingCollective) else d_w)
        d_x_in = layout.join(d_x) if need_dx else None
        out_grads = [grads[id(p)].to(p.dtype) if id(p) in grads else None for p in self.params]
        return d_x_in, layout.join_residual(d_res), out_grads

    def _norm_bwd(self, call: FusedNormCall, d_y: torch.Tensor | None, d_x: torch.Tensor,
                  d_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One recorded add + RMSNorm backward: ``(d h, d residual, d weight or None)``."""
        if self.normed_grad == "partial":
            g = d_y  # reduced by the collective just waited for
        elif call.scattered:  # replicated: this rank's rows of the full gradient
            sizes, rank = call.sizes, self.layout.rank
            g = d_x.narrow(0, sum(sizes[:rank]), sizes[rank])  # type: ignore[index]
        else:
            g = d_x
        weight = call.weight if call.weight is not None and call.weight.requires_grad else None
        inputs = [call.h, call.residual] + ([weight] if weight is not None else [])
        out = torch.autograd.grad((call.y, call.residual_out), inputs, (g, d_res), allow_unused=True)
        d_h = torch.zeros_like(call.h) if out[0] is None else out[0]
        d_residual = torch.zeros_like(call.residual) if out[1] is None else out[1]
        return d_h, d_residual, (out[2] if weight is not None else None)


class _WovenStackFn(torch.autograd.Function):
    """The whole woven stack as one autograd node: forward records the pieces
    (:class:`WeaveRun`), backward runs them by the backward schedule. Inputs: the run, ``x``,
    ``residual`` and every parameter whose gradient is wanted (returned, not accumulated)."""

    @staticmethod
    def forward(ctx: Any, run: WeaveRun, x: torch.Tensor, residual: torch.Tensor,
                *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.run = run
        with torch.enable_grad():
            normed, residual_out = run.forward(x.detach(), residual.detach())
        return normed.detach(), residual_out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_normed: torch.Tensor, d_residual_out: torch.Tensor) -> tuple[Any, ...]:
        run, ctx.run = ctx.run, None  # the recorded pieces are freed with the run
        if run is None:
            raise RuntimeError("TokenWeaver: the woven backward runs once per forward; a second backward "
                               "through the same forward (retain_graph=True) is not supported")
        d_x, d_residual, grads = run.backward(d_normed.contiguous(), d_residual_out.contiguous(),
                                              need_dx=ctx.needs_input_grad[1])
        return (None, d_x, d_residual, *grads)


def woven(run: WeaveRun, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of ``run`` whose backward is woven (``run.record`` must be True)."""
    return _WovenStackFn.apply(run, x, residual, *run.params)
