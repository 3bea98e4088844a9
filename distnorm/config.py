"""Configuration dataclasses: the ``"distnorm"`` section of a DeepSpeed JSON, and a strict ``from_dict``.

DeepSpeed keeps unknown top-level keys of its config, so a run carries its distnorm settings next
to ZeRO's::

    "distnorm": {
      "tp_size": 2,
      "convert": {"layer_norm": "sequence_parallel", "rms_norm": "sequence_parallel",
                  "batch_norm": "sync_batch_norm"},
      "sync": {"grad_sync": "backward"},
      "overlap": {"enabled": false, "mode": "reduce_scatter"}
    }

:func:`from_dict` turns such a mapping into frozen dataclasses and rejects, with a ValueError or
TypeError naming the key path, the value and the expectation, any unknown key, any value of the
wrong type and any choice outside a ``Literal``. Nothing here touches torch.distributed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["ConvertConfig", "DebugConfig", "DistNormConfig", "OverlapConfig", "SyncConfig", "convert_field", "from_dict"]

T = TypeVar("T")

TPNormTarget = Literal["keep", "sequence_parallel", "sharded"]
BatchNormTarget = Literal["keep", "sync_batch_norm", "power_norm", "unified_norm"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertConfig:
    """Which norms of the model to replace, and by what (see :mod:`distnorm.convert`)."""

    layer_norm: TPNormTarget = "keep"
    """``torch.nn.LayerNorm`` -> ``SequenceParallelLayerNorm`` / ``ShardedLayerNorm`` over the TP group."""
    rms_norm: TPNormTarget = "keep"
    """``torch.nn.RMSNorm`` and HF ``*RMSNorm`` modules -> the sequence-parallel / sharded RMSNorm."""
    batch_norm: BatchNormTarget = "keep"
    """``torch.nn.BatchNorm*d`` -> ``SyncBatchNorm`` / ``PowerNorm`` / ``UnifiedNorm`` over the DP group."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncConfig:
    """How replicated norm parameters get their cross-rank gradient sums."""

    grad_sync: Literal["backward", "deferred"] = "backward"
    """``"backward"``: each sequence-parallel norm all-reduces its own ``[dw, db]``; ``"deferred"``: one
    flat all-reduce per model by ``sync_sequence_parallel_grads`` (the caller runs it after backward)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OverlapConfig:
    """TokenWeave-style compute/communication overlap (``distnorm.overlap``)."""

    enabled: bool = False
    """Run the fused all-reduce/reduce-scatter + residual add + RMSNorm path."""
    mode: Literal["allreduce", "reduce_scatter"] = "reduce_scatter"
    """``fused_allreduce_rms_norm`` mode."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DebugConfig:
    """Run-time checks (``distnorm.debug``); off by default, each costs time."""

    consistency_checks: bool = False
    """Before every distnorm collective, ranks agree on op, shape, dtype and device (one small
    all-gather each, about 1 ms on gloo); a mismatch raises on every rank instead of hanging."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DistNormConfig:
    """The ``"distnorm"`` section of a DeepSpeed config (every key optional)."""

    tp_size: int = 1
    """Tensor-parallel degree; must divide the world size (DP = world / tp)."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """Norm conversion applied to the model before ``deepspeed.initialize``."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def apply_debug(self) -> None:
        """Switch the process-wide debug checks this config asks for on (never off: a caller may
        have enabled them by hand)."""
        if self.debug.consistency_checks:
            from distnorm import debug

            debug.enable_consistency_checks(True)

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size: must be an int >= 1, got {self.tp_size!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "distnorm") -> DistNormConfig:
        """Build from the JSON section; unknown keys and wrong types raise naming ``where.key``."""
        return from_dict(cls, {} if data is None else data, where=where)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ValueError(f"{where}: must be {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where}: must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: must be a table/object of {sorted(f.name for f in dataclasses.fields(tp))}, "
                            f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: must be a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            raise TypeError(f"{where}: must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover - a bug in a dataclass here


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build the frozen dataclass ``cls`` from a mapping, strictly.

    Unknown keys -> ValueError naming ``where.key`` and the valid keys; a value of the wrong type ->
    TypeError naming ``where.key``, the expected type and the value; a value outside a ``Literal`` ->
    ValueError listing the choices. Nested dataclasses come from nested mappings. Missing keys take
    the field's default.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict: cls must be a dataclass, got {cls!r}")
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: must be a table/object, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (value {data[unknown[0]]!r}); valid keys: {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a __post_init__ check: its message starts with the field name
        raise ValueError(f"{where}.{exc}") from None


def convert_field(cls: type, key_path: str, value: Any, *, where: str) -> Any:
    """Check and convert one value for the dotted field ``key_path`` of the dataclass ``cls``
    (``"model.norm"`` walks into a nested dataclass) exactly as :func:`from_dict` would, for a value
    that came from somewhere else than the mapping, e.g. a command-line flag.

    Errors are those of :func:`from_dict`, but begin with ``where`` (say ``"command line --norm
    (model.norm)"``) instead of the key path: the message names where the bad value came from.
    """
    tp: Any = cls
    for part in key_path.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ValueError(f"{where}: {key_path!r} is not a field of {cls.__name__}")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ValueError(f"{where}: {key_path!r} is not a field of {cls.__name__}")
        tp = hints[part]
    return _convert(tp, value, where)
