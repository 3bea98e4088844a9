"""Run a function on every rank of a small world: threads in one process, or real processes.

``simulate`` wraps torch's private threaded process group
(``torch.testing._internal.distributed.multi_threaded_pg``) — the only place distnorm touches it.
``spawn`` starts real processes on a real backend (gloo on CPU). Both return the per-rank results
in rank order, re-raise the first failing rank's exception (same type, with a note naming the
rank and carrying its traceback), and never wait past ``timeout``.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankTimeoutError", "simulate", "spawn"]

_SIMULATE_LOCK = threading.Lock()  # one simulated world per process at a time


class RankTimeoutError(TimeoutError):
    """Some ranks did not finish within the timeout of :func:`simulate` or :func:`spawn`."""


def _check_world(world_size: object, where: str) -> int:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"{where}: world_size must be a positive int, got {world_size!r}")
    return world_size


def _with_rank_note(exc: BaseException, rank: int, world: int, tb: str, others: list[int]) -> BaseException:
    note = f"raised on rank {rank} of a world of {world}"
    if others:
        note += f" (ranks {others} failed too)"
    note += f"; rank {rank} traceback:\n{tb}"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
    return exc


def simulate(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` threads that form a process group.

    Inside ``fn``, ``torch.distributed`` works as in a real job (``dist.get_rank()``,
    ``dist.new_group``, ``init_device_mesh("cpu", ...)``, the list-based collectives), backed by
    shared memory. Returns the results in rank order.

    Rank threads share the process's global RNG and module globals: build inputs outside ``fn`` or
    from an explicit ``torch.Generator``. A rank that raises wakes the others (they leave their
    collective) and its exception is re-raised here, same type, with a note naming the rank and its
    traceback. Ranks still running after ``timeout`` seconds give :class:`RankTimeoutError`.
    """
    from torch.testing._internal.distributed import multi_threaded_pg as mtpg

    world = _check_world(world_size, "simulate")
    with _SIMULATE_LOCK:
        results: list[Any] = [None] * world
        errors: dict[int, tuple[BaseException, str]] = {}
        done = [False] * world
        store = dist.HashStore()
        saved_hook = sys.excepthook

        def run(rank: int) -> None:
            try:
                dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
                try:
                    results[rank] = fn(rank, *args, **kwargs)
                finally:
                    dist.destroy_process_group()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors[rank] = (exc, traceback.format_exc())
                mtpg.ProcessLocalGroup.exception_handle(exc)  # wake ranks blocked in a collective
            finally:
                done[rank] = True

        mtpg.ProcessLocalGroup.reset()
        torch._C._distributed_c10d._set_thread_isolation_mode(True)  # type: ignore[attr-defined]
        mtpg._install_threaded_pg()
        threads = [threading.Thread(target=run, args=(r,), name=f"distnorm-rank{r}", daemon=True) for r in range(world)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck = [r for r in range(world) if not done[r]]
            if stuck:
                mtpg.ProcessLocalGroup.exception_handle(RankTimeoutError())
                for t in threads:
                    t.join(1.0)
        finally:
            mtpg._uninstall_threaded_pg()
            torch._C._distributed_c10d._set_thread_isolation_mode(False)  # type: ignore[attr-defined]
            mtpg.ProcessLocalGroup.reset()
            sys.excepthook = saved_hook

        # SystemExit is how woken ranks leave a collective: a consequence, not the cause.
        real = {r: e for r, e in errors.items() if not isinstance(e[0], SystemExit)}
        if real:
            rank = min(real)
            exc, tb = real[rank]
            raise _with_rank_note(exc, rank, world, tb, sorted(set(real) - {rank}))
        if stuck:
            raise RankTimeoutError(f"simulate: ranks {stuck} of {world} did not finish within {timeout} s")
        if errors:
            rank = min(errors)
            raise RuntimeError(f"simulate: rank {rank} exited: {errors[rank][0]}\n{errors[rank][1]}")
        return results


# --------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _to_bytes(obj: Any) -> bytes:
    # Tensors put on a multiprocessing queue travel as shared-memory handles that die with the
    # child; serialised bytes outlive it.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _spawn_entry(
    rank: int, world: int, port: int, backend: str, timeout: float,
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, *args, **kwargs)
        finally:
            gc.collect()  # free what fn dropped (a DDP model's reference cycle) while the group is alive
            dist.destroy_process_group()
        out.put((rank, "ok", _to_bytes(result)))
    except BaseException as exc:  # noqa: BLE001 - shipped to the parent
        tb = traceback.format_exc()
        try:  # the queue pickles in a background thread: find out here whether it can
            pickle.loads(pickle.dumps(exc))
            payload: BaseException = exc
        except Exception:  # noqa: BLE001 - any unpicklable exception becomes a RuntimeError
            payload = RuntimeError(f"{type(exc).__name__}: {exc}")
        out.put((rank, "error", (payload, tb)))


def spawn(
    world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo",
    timeout: float = 120.0, **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, *args, **kwargs)`` in ``world_size`` fresh processes joined by ``backend``.

    ``fn`` and its arguments must pickle (define ``fn`` at module level); results must pickle too
    (return CPU tensors). The children start with the ``spawn`` method, so they re-import the
    module that defines ``fn``: keep that module free of import-time work. A failing rank's
    exception is re-raised here with a note naming the rank; when any rank fails or the timeout
    passes, every child still running is killed.
    """
    import multiprocessing as mp

    world = _check_world(world_size, "spawn")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_spawn_entry, args=(r, world, port, backend, timeout, fn, args, kwargs, out),
                    name=f"distnorm-rank{r}", daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [None] * world
    errors: dict[int, tuple[BaseException, str]] = {}
    pending = set(range(world))
    deadline = time.monotonic() + timeout
    first_error_at = 0.0
    grace = 3.0  # after a first error, how long to wait for the others (the cause may come later)
    try:
        while pending and time.monotonic() < deadline:
            if errors and time.monotonic() > first_error_at + grace:
                break
            try:
                rank, status, payload = out.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode not in (None, 0)]
                if dead:  # a child died without reporting (segfault, os._exit)
                    time.sleep(0.5)
                    if out.empty():
                        r = dead[0]
                        pending.discard(r)
                        if not errors:
                            first_error_at = time.monotonic()
                        errors[r] = (RuntimeError(f"rank {r} died with exit code {procs[r].exitcode}"), "")
                continue
            pending.discard(rank)
            if status == "ok":
                results[rank] = _from_bytes(payload)
            else:
                if not errors:
                    first_error_at = time.monotonic()
                errors[rank] = payload
    finally:
        for p in procs:
            if p.is_alive():  # only ranks that failed or ran out of time are still alive here
                p.kill()
        for p in procs:
            p.join(5.0)
    if errors:
        raise _first_cause(errors, world)
    if pending:
        raise RankTimeoutError(f"spawn: ranks {sorted(pending)} of {world} did not finish within {timeout} s")
    return results


_PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport")


def _is_consequence(exc: BaseException) -> bool:
    """A peer's death seen from a survivor: a DistError, or gloo's transport RuntimeError."""
    if isinstance(exc, (dist.DistError, SystemExit)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_FAILURE_MARKERS)


def _first_cause(errors: dict[int, tuple[BaseException, str]], world: int) -> BaseException:
    """The lowest rank's error that is a cause, not a consequence of a peer's failure.

    When one rank dies, its peers typically fail in their next collective with a
    ``torch.distributed.DistError`` ("Connection closed by peer"); such an error may reach the parent
    first, but the dead rank's own exception is the one to report.
    """
    causes = {r: e for r, e in errors.items() if not _is_consequence(e[0])}
    chosen = causes or errors
    rank = min(chosen)
    exc, tb = chosen[rank]
    return _with_rank_note(exc, rank, world, tb, sorted(set(errors) - {rank}))
