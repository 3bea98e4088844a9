"""DeepSpeed integration: a ``"distnorm"`` section in the DeepSpeed JSON, and ``initialize``.

::

    engine, optimizer, _, _ = distnorm.integrations.deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters()), config="configs/deepspeed_zero1.json")

``initialize`` reads the top-level ``"distnorm"`` section (:class:`distnorm.config.DistNormConfig`;
DeepSpeed ignores top-level keys it does not know), joins the process group with
``init_distributed(tp=tp_size)`` (or uses the ``topology`` given), converts the model's norms as
the section says, and calls ``deepspeed.initialize(..., mpu=topology)``: DeepSpeed then takes its
data-parallel group — ZeRO's partitioning and gradient reduction — from ``topology.dp_group`` only,
never across tensor-parallel ranks. The return value is DeepSpeed's own 4-tuple.

Gradient clipping (``"gradient_clipping"``, which DeepSpeed applies at 1.0 when the key is
absent): DeepSpeed's norm counts a parameter on every TP rank when it carries
``tensor_model_parallel = True`` and on TP rank 0 only otherwise, then sums over
``mpu.get_model_parallel_group()`` (``deepspeed.runtime.utils.is_model_parallel_parameter``, read
by ZeRO stages 0-3 alike). ``initialize`` sets that attribute on exactly the TP-sharded parameters
(:func:`mark_tensor_parallel_parameters`), so DeepSpeed's clipping uses the single-device norm of
:func:`distnorm.grad_norm`. (Clipping outside DeepSpeed instead is not possible under ZeRO-2/3,
whose gradients are partitioned over DP and gone from ``p.grad`` after ``backward``.)

CPU (gloo): distnorm creates the process group itself before DeepSpeed sees it, and switches off
DeepSpeed's shared-memory all-reduce extension, which DeepSpeed would otherwise JIT-compile on
first use (minutes on a small machine; a compile killed halfway leaves a lock file that makes
every later run wait forever). That op serves only DeepSpeed's inference all-reduce.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from distnorm.config import DistNormConfig
from distnorm.topology import Topology, init_distributed

__all__ = ["SECTION", "convert_model", "initialize", "load_config", "mark_tensor_parallel_parameters"]

SECTION = "distnorm"


def load_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], DistNormConfig]:
    """``(deepspeed_dict, DistNormConfig)`` from a DeepSpeed JSON path or dict.

    A missing file, invalid JSON, a non-object top level or a bad ``"distnorm"`` section (unknown key,
    wrong type, value outside its choices) raises ValueError/TypeError naming the file and the key.
    The returned dict is a copy and still holds the section.
    """
    if isinstance(config, Mapping):
        data, where = dict(config), SECTION
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"deepspeed config: file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"deepspeed config {str(path)!r}: invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"deepspeed config {str(path)!r}: top level must be an object, got {type(data).__name__}")
        where = f"{path.name}: {SECTION}"
    else:
        raise TypeError(f"deepspeed config must be a path or a dict, got {type(config).__name__}")
    return data, DistNormConfig.from_dict(data.get(SECTION), where=where)


def convert_model(model: nn.Module, cfg: DistNormConfig, topology: Topology) -> nn.Module:
    """Apply ``cfg.convert`` to ``model``: LayerNorm/RMSNorm over ``topology.tp_group``, BatchNorm over ``dp_group``."""
    from distnorm import convert

    tp_targets = {"sequence_parallel": lambda: convert.to_sequence_parallel(topology.tp_group,
                                                                            grad_sync=cfg.sync.grad_sync),
                  "sharded": lambda: convert.to_sharded(topology.tp_group)}
    bn_targets = {"sync_batch_norm": convert.to_sync_batch_norm, "power_norm": convert.to_power_norm,
                  "unified_norm": convert.to_unified_norm}
    for kind, target in (("layer_norm", cfg.convert.layer_norm), ("rms_norm", cfg.convert.rms_norm)):
        if target != "keep":
            inner = tp_targets[target]()

            def only(module: nn.Module, kind: str = kind, inner: Any = inner) -> nn.Module | None:
                return inner(module) if convert.norm_kind(module) == kind else None

            model = convert.convert_norms(model, only)
    if cfg.convert.batch_norm != "keep":
        model = convert.convert_norms(model, bn_targets[cfg.convert.batch_norm](topology.dp_group))
    return model


def mark_tensor_parallel_parameters(model: nn.Module) -> int:
    """Tell DeepSpeed which parameters of ``model`` are TP-sharded; returns how many.

    Sets ``param.tensor_model_parallel = True`` on the parameters that
    :func:`distnorm.grad_clip.tensor_parallel_parameters` finds (by module type): the attribute
    DeepSpeed's gradient-norm code reads (its ``mpu`` contract), so that a sharded parameter is
    counted on every TP rank and a replicated one (no attribute) once. Other parameters are left
    as they are (a Megatron layer's own marks stay). distnorm never reads it. No collectives.
    """
    from distnorm.grad_clip import tensor_parallel_parameters

    sharded = [p for _, params in tensor_parallel_parameters(model) for p in params]
    for p in sharded:
        p.tensor_model_parallel = True  # type: ignore[attr-defined]
    return len(sharded)


def _skip_cpu_shm_build() -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(
    *,
    model: nn.Module,
    config: str | os.PathLike[str] | Mapping[str, Any],
    topology: Topology | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with distnorm's section applied; returns DeepSpeed's ``(engine, optimizer,
    dataloader, lr_scheduler)``.

    ``config``: DeepSpeed JSON path or dict. ``topology``: an existing :class:`Topology` (its TP size
    must equal the section's ``tp_size``); default ``init_distributed(tp=tp_size)``. Other keyword
    arguments (``optimizer``, ``model_parameters``, ``lr_scheduler``, ...) go to DeepSpeed unchanged;
    ``mpu`` is always the topology. ``overlap.enabled`` needs :mod:`distnorm.overlap`.
    Collectives: those of ``init_distributed`` and ``deepspeed.initialize`` (parameter broadcast
    over the DP group); conversion issues none.
    """
    if "mpu" in kwargs:
        raise ValueError("distnorm.integrations.deepspeed.initialize: do not pass mpu; the Topology is the mpu")
    ds_config, cfg = load_config(config)
    topo = topology if topology is not None else init_distributed(tp=cfg.tp_size)
    if topo.tp_size != cfg.tp_size:
        raise ValueError(
            f"distnorm.tp_size={cfg.tp_size} does not match the topology's tp_size={topo.tp_size} (rank {topo.rank})"
        )
    if cfg.overlap.enabled:
        try:
            import distnorm.overlap  # noqa: F401
        except ImportError:
            raise ValueError(
                f"distnorm.overlap.enabled=true needs distnorm.overlap, which this build does not have (rank {topo.rank})"
            ) from None
    cfg.apply_debug()
    model = convert_model(model, cfg, topo)
    mark_tensor_parallel_parameters(model)
    _skip_cpu_shm_build()
    import deepspeed

    return tuple(deepspeed.initialize(model=model, config=ds_config, mpu=topo, dist_init_required=False, **kwargs))
