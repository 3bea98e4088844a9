"""Debugging aids that turn distributed bugs (hangs, diverging replicas, NaNs) into early, clear errors.

* :func:`consistency_checks` (context manager) / :func:`enable_consistency_checks` (the process-wide
  flag a config sets): before each distnorm collective, the ranks of its group all-gather a
  14-number description of what they are about to do — collective kind, calling function, shape,
  dtype, device type — and raise on **every** rank a RuntimeError that names the op and each
  rank's value when they disagree, instead of hanging or reducing garbage. On the first forward of
  each distnorm module they also compare the module's hyper-parameters across its group
  (:func:`check_hyper_parameters`: eps, sizes, affine flags, momentum, group size, parameter
  dtypes...), which no collective's shape reveals. Off by default.
* :func:`check_replicas`: are the replicated parameters and buffers (running statistics) of a model
  bitwise identical across a group? One all-reduce of exact integer checksums; details only when
  something differs.
* :func:`detect_nonfinite`: forward (and backward) module hooks that name the first module and
  rank producing NaN/Inf from finite inputs.

Costs (all off unless asked for):

* consistency checks: one extra all-gather of 14 int64 (112 B) per rank before every distnorm
  collective, plus a host sync to compare them (so async overlap is serialised) and a Python stack
  walk. On the gloo/CPU path that roughly doubles the latency of small collectives. Once per
  distnorm module with a group of P > 1: one all-gather of 2 int64 (its hyper-parameters' checksum)
  on its first forward, and a forward pre-hook on every module call while the checks are on. A
  mismatch costs one more ``all_gather_object`` to fetch the readable descriptions.
* check_replicas: one all-reduce of ``6 * num_tensors`` int64 and a pass over every byte of the
  checked tensors; on a mismatch one ``all_gather_object`` of the differing tensors.
* detect_nonfinite: one ``isfinite`` reduction and host sync per module output (and input).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnorm import comm
from distnorm.comm import Group, group_rank, group_size

__all__ = [
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteReport",
    "check_hyper_parameters",
    "check_replicas",
    "consistency_check_stats",
    "consistency_checks",
    "consistency_checks_enabled",
    "detect_nonfinite",
    "enable_consistency_checks",
    "hyper_parameters",
]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------------------------
# Cross-rank consistency checks
# --------------------------------------------------------------------------------------------

_MAX_DIMS = 8
_FIELDS = ("op", "called from", "dtype", "device", "shape")
# kind, call site, dtype, device type, ndim, shape[0..7] (dims past 8 folded into a checksum)
_DESC_LEN = 5 + _MAX_DIMS + 1
_SKIP_FILES = {str(Path(comm.__file__).resolve()), str(Path(__file__).resolve())}
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_state = threading.local()  # .busy: inside a check (its own all-gather must not be checked)


def _code(text: str) -> int:
    return zlib.crc32(text.encode())  # stable across processes, unlike hash()


def _qualname(frame: FrameType) -> str:
    code = frame.f_code
    return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"


@functools.cache
def _frame_kind(path: str) -> str:
    """``"ours"`` (comm / debug), ``"torch"`` (torch or a ``<frozen ...>`` frame) or ``"caller"``."""
    if path.startswith("<"):
        return "torch"
    resolved = str(Path(path).resolve())
    if resolved in _SKIP_FILES:
        return "ours"
    return "torch" if resolved.startswith(_TORCH_DIR) else "caller"


def _call_site() -> str:
    """The function that issued the collective: the first frame outside comm, debug and torch.

    A collective issued by the backward of one of comm's autograd pairs is named after that
    backward (the frame beyond it is autograd's engine, then whatever called ``.backward()``).
    """
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        kind = _frame_kind(frame.f_code.co_filename)
        if kind == "caller" or (kind == "ours" and frame.f_code.co_name == "backward"):
            return _qualname(frame)
        frame = frame.f_back
    return "<unknown>"


def _describe(kind: str, tensor: torch.Tensor) -> dict[str, str]:
    return {
        "op": kind,
        "called from": _call_site(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "device": tensor.device.type,
        "shape": str(tuple(tensor.shape)),
    }


def _encode(desc: dict[str, str], tensor: torch.Tensor) -> list[int]:
    shape = list(tensor.shape)
    dims = shape[:_MAX_DIMS] + [-1] * (_MAX_DIMS - min(len(shape), _MAX_DIMS))
    rest = _code(str(shape[_MAX_DIMS:]))
    return [_code(desc["op"]), _code(desc["called from"]), _code(desc["dtype"]), _code(desc["device"]),
            len(shape), *dims, rest]


def _check_device(group: Group) -> torch.device:
    if torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mismatch_message(descs: Sequence[dict[str, str]], group: Group) -> str:
    world = len(descs)
    ops = sorted({d["op"] for d in descs})
    lines = [
        f"distnorm consistency check failed before {' / '.join(ops)} on a group of {world} ranks: "
        f"the ranks disagree (raised on rank {group_rank(group)} of the group, global rank {_rank()})."
    ]
    for name in _FIELDS:
        values = [d[name] for d in descs]
        if len(set(values)) > 1:
            per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            lines.append(f"  {name}: {per_rank}")
        else:
            lines.append(f"  {name}: {values[0]} (all ranks)")
    lines.append("Every rank of a group must issue the same collectives, in the same order, with the same "
                 "shapes and dtypes (see docs/troubleshooting.md).")
    return "\n".join(lines)


def _consistency_hook(kind: str, tensor: torch.Tensor, group: Group) -> None:
    # all_gather_object carries no tensor to compare; the check's own collectives are not checked.
    if kind == "all_gather_object" or getattr(_state, "busy", False) or group_size(group) == 1:
        return
    # The check's own collectives stay out of count_collectives(), so the op's pinned contract
    # holds with checks on; they are counted in _state.checks / _state.check_bytes instead.
    counters = comm._active_counters()
    hidden = list(counters)
    counters.clear()
    _state.busy = True
    try:
        desc = _describe(kind, tensor)
        codes = torch.tensor(_encode(desc, tensor), dtype=torch.int64, device=_check_device(group))
        world = group_size(group)
        _state.checks = getattr(_state, "checks", 0) + 1
        _state.check_bytes = getattr(_state, "check_bytes", 0) + codes.nbytes
        rows = comm.all_gather_uneven(codes, group).view(world, _DESC_LEN).tolist()  # host sync: debug only
        if all(row == rows[0] for row in rows):
            return
        descs = comm.all_gather_object(desc, group)
        raise RuntimeError(_mismatch_message(descs, group))
    finally:
        _state.busy = False
        counters.extend(hidden)


def _thread_hook(kind: str, tensor: torch.Tensor, group: Group) -> None:
    if _consistency_hook not in comm._GLOBAL_HOOKS:  # the flag already checks every collective
        _consistency_hook(kind, tensor, group)


def enable_consistency_checks(enabled: bool = True) -> bool:
    """Turn the cross-rank consistency checks on or off for the whole process; returns the old state.

    What a config with ``"debug": {"consistency_checks": true}`` calls (``DistNormConfig.apply_debug``). Unlike :func:`consistency_checks`
    (which covers the calling thread), the flag also covers autograd's device threads, where
    CUDA backward passes run. Every rank must set the same value.
    """
    was = consistency_checks_enabled()
    if enabled and not was:
        comm._GLOBAL_HOOKS.append(_consistency_hook)
        _module_hook_acquire()
    elif not enabled and was:
        comm._GLOBAL_HOOKS.remove(_consistency_hook)
        _module_hook_release()
    return was


def consistency_check_stats() -> tuple[int, int]:
    """``(checks, bytes)`` this thread's consistency checks have issued so far (one all-gather each)."""
    return getattr(_state, "checks", 0), getattr(_state, "check_bytes", 0)


def consistency_checks_enabled() -> bool:
    """Whether :func:`enable_consistency_checks` is on (the context manager is not counted)."""
    return _consistency_hook in comm._GLOBAL_HOOKS


@contextlib.contextmanager
def consistency_checks() -> Iterator[None]:
    """Check, before each distnorm collective issued by this thread, that all ranks agree on it.

    Inside the block every collective that goes through :mod:`distnorm.comm` on a group of P > 1
    ranks is preceded by one all-gather of a 14-number description per rank (collective kind,
    the function that issued it, dtype, device type, shape; uneven all-gathers are compared on the
    padded shard every rank sends, so legitimate uneven splits agree). When the descriptions
    differ, every rank raises the same RuntimeError naming the op and each rank's value; a rank
    that has died or never arrives still gives the process group's timeout error. The first
    forward of each distnorm module inside the block also runs :func:`check_hyper_parameters`.

    Cost: 1 extra all-gather (112 B per rank) and a host sync per collective; these all-gathers
    are kept out of ``count_collectives`` (so pinned contracts hold with checks on) and counted by
    :func:`consistency_check_stats` instead. Covers this thread only: a CPU backward runs on the calling thread, a
    CUDA backward on autograd's device threads — use :func:`enable_consistency_checks` there.
    Every rank must enter the block alike.
    """
    hooks = comm._active_hooks()
    hooks.append(_thread_hook)
    _module_hook_acquire()
    try:
        yield
    finally:
        _module_hook_release()
        hooks.remove(_thread_hook)


# --------------------------------------------------------------------------------------------
# Hyper-parameters, compared on a module's first use
# --------------------------------------------------------------------------------------------

_SIMPLE = (bool, int, float, str, type(None), torch.dtype)
# Attributes that legitimately differ across ranks (this rank's piece of a sharded module), plus
# names ending in _local / _shard (STYLE.md) and whatever a class lists in ``rank_local_attributes``.
_RANK_LOCAL = ("local_size", "param_shape")
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_module_hook_lock = threading.Lock()
_module_hook: list[Any] = [0, None]  # [users, handle of the global forward pre-hook]


def _is_simple(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _rank_local(module: nn.Module, name: str) -> bool:
    return (name in _RANK_LOCAL or name.endswith(("_local", "_shard"))
            or name in getattr(module, "rank_local_attributes", ()))


def _module_group(module: nn.Module) -> Group:
    """The process group a distnorm module talks over: its ``group``, else its first descendant's."""
    for m in module.modules():
        group = getattr(m, "group", None)
        if isinstance(group, dist.ProcessGroup):
            return group
    return None


def hyper_parameters(module: nn.Module) -> dict[str, str]:
    """What every rank of a module's group must agree on, as ``{field: repr}``.

    The module's class, its group size, its public attributes of simple type (numbers, strings,
    flags, dtypes and tuples of them: ``eps``, ``normalized_shape``, ``momentum``, ``affine``,
    ``channel_dim``, ``warmup_iters``...) except this rank's pieces (``local_size``,
    ``param_shape``, names ending in ``_local`` / ``_shard`` and any listed in the class attribute
    ``rank_local_attributes``, which legitimately differ across ranks), and the name and
    dtype of each of its own parameters and buffers (``bias=False`` on one rank shows as a missing
    ``parameter bias``). The same for every descendant module, prefixed with its name.
    """
    out: dict[str, str] = {}
    for prefix, m in module.named_modules():
        at = f"{prefix}." if prefix else ""
        out[f"{at}class"] = type(m).__qualname__
        for name, value in sorted(vars(m).items()):
            if not name.startswith("_") and name != "training" and not _rank_local(m, name) and _is_simple(value):
                out[f"{at}{name}"] = repr(value)
        for kind, tensors in (("parameter", m.named_parameters(recurse=False)), ("buffer", m.named_buffers(recurse=False))):
            for name, t in tensors:
                out[f"{at}{kind} {name}"] = str(t.dtype).removeprefix("torch.")
    out["group size"] = str(group_size(_module_group(module)))
    return out


def check_hyper_parameters(module: nn.Module, group: Group = None) -> None:
    """Raise on every rank of ``group`` (default: the module's own) when its ranks configure ``module`` differently.

    Compares :func:`hyper_parameters`: a different ``eps`` on two ranks of a ``ShardedRMSNorm``,
    another ``momentum``, ``affine`` or ``num_features`` on one replica... — mistakes no
    collective's shape reveals, which otherwise train silently wrong. The RuntimeError names the
    module, each differing field and every rank's value. Run automatically on the first forward of
    each distnorm module while :func:`consistency_checks` is on.

    Collectives (P > 1): 1 all-gather of 2 int64 (a checksum and the field count); on a mismatch
    1 ``all_gather_object`` of the descriptions. Every rank must call it alike.
    """
    group = _module_group(module) if group is None else group
    world = group_size(group)
    if world == 1:
        return
    desc = hyper_parameters(module)
    text = "\n".join(f"{k}={v}" for k, v in sorted(desc.items()))
    codes = torch.tensor([_code(text), len(desc)], dtype=torch.int64, device=_check_device(group))
    busy, _state.busy = getattr(_state, "busy", False), True  # the check's own collectives are not checked
    counters = comm._active_counters()
    hidden = list(counters)
    counters.clear()  # nor counted: pinned contracts hold with checks on
    try:
        _state.checks = getattr(_state, "checks", 0) + 1
        _state.check_bytes = getattr(_state, "check_bytes", 0) + codes.nbytes
        rows = comm.all_gather_uneven(codes, group).view(world, 2).tolist()  # host sync: debug only
        if all(row == rows[0] for row in rows):
            return
        everyone = comm.all_gather_object(desc, group)
    finally:
        _state.busy = busy
        counters.extend(hidden)
    fields = sorted({k for d in everyone for k in d})
    lines = [
        f"distnorm consistency check failed: {type(module).__name__} is configured differently on the ranks of its "
        f"group of {world} (raised on rank {group_rank(group)} of the group, global rank {_rank()}):"
    ]
    for name in fields:
        values = [d.get(name, "<absent>") for d in everyone]
        if len(set(values)) > 1:
            lines.append(f"  {name}: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    lines.append("Build the module with the same arguments on every rank (see docs/troubleshooting.md).")
    raise RuntimeError("\n".join(lines))


def _checks_active() -> bool:
    return consistency_checks_enabled() or _thread_hook in comm._active_hooks()


def _first_use_hook(module: nn.Module, args: Any) -> None:
    if (torch.compiler.is_compiling() or module in _CHECKED or not type(module).__module__.startswith("distnorm.")
            or getattr(_state, "busy", False) or not _checks_active()):
        return
    for m in module.modules():  # the outermost distnorm module checks its descendants too
        _CHECKED.add(m)
    check_hyper_parameters(module)


def _module_hook_acquire() -> None:
    with _module_hook_lock:
        if _module_hook[0] == 0:
            _module_hook[1] = nn.modules.module.register_module_forward_pre_hook(_first_use_hook)
        _module_hook[0] += 1


def _module_hook_release() -> None:
    with _module_hook_lock:
        _module_hook[0] -= 1
        if _module_hook[0] == 0:
            _module_hook[1].remove()
            _module_hook[1] = None


# --------------------------------------------------------------------------------------------
# Replica drift
# --------------------------------------------------------------------------------------------

_FINGERPRINT_LEN = 3  # numel * 2^8 + dtype code, byte sum, position-weighted byte sum
_PRIME = 65521


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Exact int64 checksum of a tensor's bytes: equal tensors (bitwise) give equal fingerprints.

    Sum of bytes and sum of bytes weighted by ``(position mod 65521) + 1``: a changed byte changes
    the first, swapped bytes the second. No overflow below 2^39 bytes.
    """
    data = t.detach().contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.numel() else torch.zeros(0, dtype=torch.uint8, device=data.device)
    raw = raw.to(torch.int64)
    weights = torch.arange(raw.numel(), device=raw.device, dtype=torch.int64).remainder_(_PRIME).add_(1)
    header = torch.tensor(t.numel() * 256 + _code(str(t.dtype)) % 256, dtype=torch.int64, device=raw.device)
    return torch.stack([header, raw.sum(), (raw * weights).sum()])


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.numel() == 0 or torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _default_include(model: nn.Module, group: Group) -> Callable[[str, torch.Tensor], bool]:
    """Everything except parameters sharded over ``group`` (found by module type)."""
    try:
        from distnorm.tensor_parallel.checkpoint import shard_layout
    except ImportError:  # tensor-parallel checkpointing not available: nothing is sharded
        return lambda name, t: True
    layout = shard_layout(model)
    members = set(dist.get_process_group_ranks(group)) if group is not None else set()

    def sharded_here(g: Group) -> bool:
        return g is group or (g is not None and set(dist.get_process_group_ranks(g)) == members)

    sharded = {key for key, (_, _, g) in layout.items() if sharded_here(g)}
    return lambda name, t: name not in sharded


def check_replicas(
    model: nn.Module,
    group: Group,
    *,
    include: Callable[[str, torch.Tensor], bool] | None = None,
) -> list[str]:
    """Verify that ``model``'s replicated parameters and buffers are bitwise identical across ``group``.

    Checks every entry of ``named_parameters()`` and ``named_buffers()`` (running statistics,
    step counters) for which ``include(name, tensor)`` is true; by default all of them except the
    parameters sharded over ``group`` itself (hidden-sharded norms and parallel linears, found by
    module type through :func:`distnorm.tensor_parallel.checkpoint.shard_layout`). Returns the
    names checked. On a difference raises, on every rank, a RuntimeError naming each differing
    tensor, which ranks agree with which, and the largest difference from group rank 0.

    Collectives (P > 1): 1 all-reduce (max) of ``6 * num_tensors`` int64 (exact byte checksums and
    their negations); on a mismatch 1 ``all_gather_object`` of the differing tensors. Every rank
    must hold the same parameter and buffer names. group None or P == 1: none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_replicas: model must be an nn.Module, got {type(model).__name__} (rank {_rank()})")
    world = group_size(group)
    include = _default_include(model, group) if include is None else include
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if include(n, t)]
    names = [n for n, _ in named]
    if world == 1:
        return names
    device = _check_device(group)
    names_code = torch.tensor([_code("\n".join(names)), len(names), 0], dtype=torch.int64)
    local = torch.stack([names_code, *(_fingerprint(t).cpu() for _, t in named)]).to(device)
    both = torch.cat([local, -local])
    comm.all_reduce_(both, group, op="max")
    high, neg_low = both.split(local.shape[0])
    differs = (high != -neg_low).any(dim=1).tolist()
    if differs[0]:
        got = comm.all_gather_object(names, group)
        raise RuntimeError(
            "check_replicas: the ranks of the group hold different tensors: "
            + "; ".join(f"rank {r}: {len(n)} names ({', '.join(n[:4])}{', ...' if len(n) > 4 else ''})"
                        for r, n in enumerate(got))
            + f" (rank {group_rank(group)} of {world})"
        )
    bad = [name for name, d in zip(names, differs[1:], strict=True) if d]
    if not bad:
        return names
    tensors = dict(named)
    everyone = comm.all_gather_object({n: tensors[n].detach().cpu() for n in bad}, group)
    lines = []
    for name in bad:
        copies = [per_rank[name] for per_rank in everyone]
        classes: list[list[int]] = []
        for r, c in enumerate(copies):
            cls = next((cls for cls in classes if _bitwise_equal(copies[cls[0]], c)), None)
            if cls is None:
                classes.append([r])
            else:
                cls.append(r)
        diffs = []
        for r, c in enumerate(copies[1:], start=1):
            if c.shape == copies[0].shape:
                delta = (c.double() - copies[0].double()).abs().max().item() if c.numel() else 0.0
                diffs.append(f"rank {r}: {delta:.3g}")
            else:
                diffs.append(f"rank {r}: shape {tuple(c.shape)} vs {tuple(copies[0].shape)}")
        lines.append(f"  {name!r}: ranks agreeing: {' | '.join(str(c) for c in classes)}; "
                     f"max |rank r - rank 0|: {', '.join(diffs)}")
    raise RuntimeError(
        f"check_replicas: {len(bad)} of {len(names)} replicated tensors differ across the group of "
        f"{world} ranks (raised on rank {group_rank(group)}, global rank {_rank()}):\n" + "\n".join(lines)
    )


# --------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonFiniteEvent:
    """A module that produced NaN/Inf from finite inputs."""

    module: str
    """Qualified name in the model (class name when no model was given)."""
    module_type: str
    rank: int
    phase: str
    """``"forward"`` (an output) or ``"backward"`` (a gradient w.r.t. an input)."""
    where: str
    """Which output / input gradient, e.g. ``"output[0]"``."""
    nonfinite_params: tuple[str, ...] = ()
    """The module's own parameters/buffers that were already non-finite."""

    def __str__(self) -> str:
        params = f"; its non-finite parameters/buffers: {', '.join(self.nonfinite_params)}" if self.nonfinite_params else ""
        inputs = "gradients w.r.t. its outputs" if self.phase == "backward" else "inputs"
        return (f"non-finite values first produced by module {self.module!r} ({self.module_type}) in {self.phase} "
                f"{self.where} on rank {self.rank}; its {inputs} were finite{params}")


class NonFiniteError(RuntimeError):
    """Raised by :func:`detect_nonfinite` at the first module that produces NaN/Inf."""

    def __init__(self, event: NonFiniteEvent) -> None:
        super().__init__(f"detect_nonfinite: {event}")
        self.event = event


@dataclass
class NonFiniteReport:
    """What :func:`detect_nonfinite` saw on this rank, in order."""

    events: list[NonFiniteEvent] = field(default_factory=list)

    @property
    def first(self) -> NonFiniteEvent | None:
        return self.events[0] if self.events else None


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}[{k!r}]")


def _first_nonfinite(value: Any, prefix: str) -> str | None:
    for where, t in _tensors(value, prefix):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            return where
    return None


@contextlib.contextmanager
def detect_nonfinite(
    model: nn.Module | None = None, *, backward: bool = True, raise_error: bool = True
) -> Iterator[NonFiniteReport]:
    """Name the first module (and rank) that turns finite values into NaN/Inf.

    Hooks every submodule of ``model`` (every module in the process when ``model`` is None; then
    modules are named by class): after a forward, an output with NaN/Inf whose inputs were all
    finite is attributed to that module; with ``backward=True``, a gradient w.r.t. an input with
    NaN/Inf whose incoming gradients were finite likewise. Children run before their parents, so
    the innermost producer is named. With ``raise_error`` (default) the first event raises
    :class:`NonFiniteError` on the rank that saw it (its peers then stop at their next collective,
    with the process group's timeout error); otherwise events are collected in the yielded
    :class:`NonFiniteReport`. Costs a host sync per module; for debugging only.
    """
    report = NonFiniteReport()
    names: dict[int, str] = {}
    if model is not None:
        names = {id(m): n or "<root>" for n, m in model.named_modules()}

    def record(module: nn.Module, phase: str, where: str) -> None:
        bad = tuple(n for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        event = NonFiniteEvent(module=names.get(id(module), type(module).__name__), module_type=type(module).__name__,
                               rank=_rank(), phase=phase, where=where, nonfinite_params=bad)
        report.events.append(event)
        if raise_error:
            raise NonFiniteError(event)

    def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
        where = _first_nonfinite(output, "output")
        if where is not None and _first_nonfinite(args, "input") is None:
            record(module, "forward", where)

    def backward_hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        where = _first_nonfinite(grad_input, "grad_input")
        if where is not None and _first_nonfinite(grad_output, "grad_output") is None:
            record(module, "backward", where)

    handles: list[Any] = []
    try:
        if model is None:
            handles.append(nn.modules.module.register_module_forward_hook(forward_hook))
            if backward:
                handles.append(nn.modules.module.register_module_full_backward_hook(backward_hook))
        else:
            for m in model.modules():
                handles.append(m.register_forward_hook(forward_hook))
                if backward:
                    handles.append(m.register_full_backward_hook(backward_hook))
        yield report
    finally:
        for h in handles:
            h.remove()
