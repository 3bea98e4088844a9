"""The static schedule :class:`~distnorm.overlap.TokenWeaver` runs, and its cost-model replay.

A stack of ``L`` blocks on one token chunk is a chain of *steps*: host work (a block's compute,
the fused residual + RMSNorm, or their backwards) followed by at most one collective, which the
chunk's next step waits for. Per block and direction the chains are (``C`` = ``block.partial``,
``N`` = add + RMSNorm, ``'`` = backward, ``|x|`` = a collective)::

    forward  allreduce        C |all-reduce| N C |all-reduce| N C ...
    forward  reduce_scatter   C |reduce-scatter| N |all-gather| C ...
    backward allreduce        |all-reduce| N' C' |all-reduce| N' C' ...     (normed_grad="partial")
                              N' C' N' C' ...                               ("replicated")
    backward reduce_scatter   |reduce-scatter| N' |all-gather| C' |reduce-scatter| ...   ("partial")
                              N' |all-gather| C' N' |all-gather| ...                     ("replicated")

:func:`interleave` runs the chunks' chains in turns, step by step: wait for the chunk's last
collective, do its host work, issue its next collective, go to the next chunk. So each
collective is in flight while the other chunks work. The order is fixed by the arguments alone,
never by which collective finishes first: every rank issues the same collectives in the same
order, as collectives require.

A collective is hidden when the other chunks' host work between its issue and its wait lasts as
long. In reduce_scatter mode the norm between a chunk's two collectives runs on the host: with
two chunks one of the two collectives can only wait behind the other chunk's short norm (about
half the link time stays exposed), with three (staggered) both hide behind computes.
:func:`replay` predicts all of it.

Pure functions, no torch: the runner (:mod:`distnorm.overlap.token_split`) executes the events,
:func:`replay` times them with a cost model, tests pin them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Step", "chain", "interleave", "replay"]

Work = tuple[str, int]
"""``(what, block)``: ``what`` is ``"compute"``, ``"norm"``, ``"compute_bwd"`` or ``"norm_bwd"``."""


@dataclass(frozen=True, slots=True)
class Step:
    """One chunk's step: host ``work`` in order, then ``collective`` (None: none) issued on its result."""

    work: tuple[Work, ...]
    collective: str | None


def chain(mode: str, num_layers: int, *, backward: bool = False, normed_grad: str = "replicated") -> tuple[Step, ...]:
    """The steps of one chunk through ``num_layers`` blocks (module docstring), forward or backward.

    ``normed_grad`` matters for the backward only: with ``"partial"`` the gradient arriving at each
    norm is reduced first (all-reduce or reduce-scatter), with ``"replicated"`` it is already
    whole.
    """
    L = num_layers
    if mode == "allreduce" and not backward:
        steps = [Step(((("norm", i - 1),) if i else ()) + (("compute", i),), "all_reduce") for i in range(L)]
        return (*steps, Step((("norm", L - 1),), None))
    if mode == "reduce_scatter" and not backward:
        pairs = [(Step((("compute", i),), "reduce_scatter"), Step((("norm", i),), "all_gather")) for i in range(L)]
        return (*[s for pair in pairs for s in pair], Step((), None))
    blocks = range(L - 1, -1, -1)
    if mode == "allreduce" and normed_grad == "partial":
        steps = [Step((), "all_reduce")]
        steps += [Step((("norm_bwd", i), ("compute_bwd", i)), "all_reduce" if i else None) for i in blocks]
        return tuple(steps)
    if mode == "allreduce":
        return tuple(Step((("norm_bwd", i), ("compute_bwd", i)), None) for i in blocks)
    if normed_grad == "partial":
        steps = [Step((), "reduce_scatter")]
        for i in blocks:
            steps += [Step((("norm_bwd", i),), "all_gather"), Step((("compute_bwd", i),), "reduce_scatter" if i else None)]
        return tuple(steps)
    steps = [Step(((("compute_bwd", i + 1),) if i < L - 1 else ()) + (("norm_bwd", i),), "all_gather") for i in blocks]
    return (*steps, Step((("compute_bwd", 0),), None))


def interleave(steps: Sequence[Step], chunks: int) -> Iterator[tuple[str, int, int]]:
    """The events of ``chunks`` chunks running ``steps``, staggered: in turn ``t`` chunk ``c`` does
    its step ``t - c``, the most delayed chunk first. Events: ``("wait", c, k)`` (chunk ``c`` waits
    for the collective of its step ``k``), ``("work", c, k)``, ``("issue", c, k)``, and
    ``("round", -1, k)`` once every chunk has done step ``k``.

    With two chunks this is plain round-robin (A_k, B_k, A_{k+1}, ...). With three, a chunk's
    collective is followed by the other two chunks' work before the chunk's next step: in
    reduce_scatter mode each chunk's reduce-scatter hides behind one compute and its all-gather
    behind the next, where two chunks can hide only one of the two (module docstring).
    """
    last = chunks - 1
    for turn in range(len(steps) + last):
        for c in range(last, -1, -1):
            k = turn - c
            if not 0 <= k < len(steps):
                continue
            step = steps[k]
            if k and steps[k - 1].collective is not None:
                yield "wait", c, k - 1
            if step.work:
                yield "work", c, k
            if step.collective is not None:
                yield "issue", c, k
            if c == last:
                yield "round", -1, k


def replay(
    steps: Sequence[Step],
    chunk_tokens: Sequence[int],
    *,
    host_s: Callable[[Work, int], float],
    link_s: Callable[[str, int], float],
    blocking_s: Callable[[Work, int], float] = lambda work, n: 0.0,
    round_link_s: Callable[[Step], float] = lambda step: 0.0,
) -> float:
    """Makespan of :func:`interleave` on two serial engines: the host and a FIFO link.

    ``host_s(work, n)``: host time of one work item on a chunk of ``n`` tokens; ``link_s(kind,
    n)``: link time of one collective; ``blocking_s(work, n)``: link time of a collective *inside*
    the work that the host waits for (e.g. the consumer's all-reduce of ``"replicated"``);
    ``round_link_s(step)``: link time of a collective issued after each round and waited for at
    the end (the weight-gradient all-reduce). A chunk's wait ends when its collective leaves the
    link; a collective starts when it is issued and the link is free.
    """
    host = link = tail = 0.0
    ready = [0.0] * len(chunk_tokens)
    for event, c, k in interleave(steps, len(chunk_tokens)):
        if event == "wait":
            host = max(host, ready[c])
        elif event == "work":
            for work in steps[k].work:
                host += host_s(work, chunk_tokens[c])
                blocked = blocking_s(work, chunk_tokens[c])
                if blocked:
                    host = link = max(host, link) + blocked
        elif event == "issue":
            link = max(link, host) + link_s(steps[k].collective, chunk_tokens[c])  # type: ignore[arg-type]
            ready[c] = link
        else:
            extra = round_link_s(steps[k])
            if extra:
                link = max(link, host) + extra
                tail = max(tail, link)
    return max(host, tail)
