"""Meta-device init: build on ``meta``, ``to_empty()``, reset -> exactly a freshly constructed module.

What FSDP2 and torchtitan do with a large model: construct it under ``torch.device("meta")``
(no memory), materialise it with ``to_empty()`` (uninitialised memory) and call every module's
``reset_parameters()`` (and ``reset_running_stats()`` where it keeps statistics). Every parameter
and buffer — running statistics, step counters, skip counters, non-persistent ones included — must
then equal, bitwise, what a fresh construction under the same global seed gives. The memory
``to_empty()`` returns is filled with garbage (NaN / a large integer) first, so a buffer that no
reset touches cannot pass by luck. Worlds 1 and 3 (uneven hidden shards) in ``simulate``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distnorm.testing import simulate
from tests.compose.cases import _RNG_LOCK, BY_NAME, CASES

STATE_KINDS = ("parameters", "buffers")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _garbage_(module: nn.Module) -> None:
    with torch.no_grad():
        for t in _state(module).values():
            t.fill_(float("nan") if t.is_floating_point() else 987654321)


def reset(module: nn.Module) -> list[str]:
    """Every module's ``reset_running_stats()`` and ``reset_parameters()``; the names of stateful modules lacking one."""
    missing = []
    for name, m in module.named_modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif _owns_state(m):
            missing.append(f"{name or '<root>'} ({type(m).__name__})")
    return missing


def _meta_vs_fresh(rank: int, name: str) -> tuple[list[str], dict[str, str]]:
    import torch.distributed as dist

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    case = BY_NAME[name]
    with _RNG_LOCK:  # rank threads share the global RNG
        torch.manual_seed(0)
        fresh = case.make(group)
        with torch.device("meta"):
            meta = case.make(group)
        assert all(t.is_meta for t in _state(meta).values()), "construction under torch.device('meta') allocated memory"
        meta.to_empty(device="cpu")
        _garbage_(meta)
        torch.manual_seed(0)
        missing = reset(meta)
    want, got = _state(fresh), _state(meta)
    diffs = {}
    for key in want.keys() | got.keys():
        w, g = want.get(key), got.get(key)
        if w is None or g is None:
            diffs[key] = "missing" if g is None else "unexpected"
        elif w.shape != g.shape or w.dtype != g.dtype or not torch.equal(w, g):
            diffs[key] = f"fresh {w.dtype}{tuple(w.shape)} {w.flatten()[:4].tolist()} != reset {g.dtype}{tuple(g.shape)} " \
                         f"{g.flatten()[:4].tolist()}"
    return missing, diffs


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_meta_init_equals_fresh_module(name, world):
    for rank, (missing, diffs) in enumerate(simulate(world, _meta_vs_fresh, name, timeout=60)):
        assert not missing, f"{name}: modules with parameters or buffers but no reset_parameters(): {missing}"
        assert not diffs, f"{name} (rank {rank} of {world}): meta -> to_empty -> reset differs from a fresh module: {diffs}"
