"""Checkpoints of the demo trainer: save every N steps, resume at the same or at another TP x DP shape.

One checkpoint is a directory ``<run_dir>/checkpoints/step_<N>/``:

* ``format = "dcp"`` (python, torchrun, mpirun): one ``torch.distributed.checkpoint`` with
  ``model`` (the state dict as :func:`distnorm.tensor_parallel.checkpoint.to_dcp` lays it out:
  TP-sharded parameters as DTensors ``Shard(dim)`` over the TP group — their layout —, replicated
  parameters and buffers, i.e. the norms' running statistics, as plain tensors; the fused q/k/v
  weights as their TP-independent ``[3, d, ...]`` view, see :func:`launch.model.fused_qkv_keys`),
  ``optim`` (AdamW's moments and step per parameter *name*, each moment laid out like its
  parameter) and ``rng.rank<r>`` (each rank's CPU generator). DCP reshards on load, so a
  checkpoint saved at TP=2 x DP=2 loads at TP=1, DP=1 or TP=2 alike.
* ``format = "deepspeed"``: DeepSpeed's own ``engine.save_checkpoint`` under ``deepspeed/`` (module,
  ZeRO partitions, LR scheduler) plus ``rng_rank<r>.pt``; it resumes at the shape and ZeRO stage it
  was saved with (DeepSpeed's partitions are per DP rank).
* ``meta.json``, written by rank 0 **last**: the data position (``step``), the optimizer's
  hyper-parameters and the LR schedule's state, the loss history, the run's shape and config, and
  the size of every other file. A directory without it is an unfinished save and is refused.

On resume every file is checked against ``meta.json`` (a truncated file is refused naming the file
and the keys it holds), the model and data settings must match the run's (a mismatch names the
``meta.json`` key), and every DCP key and shape must match this model's (a mismatch names the key
and ``.metadata``). All ranks read the same files and fail alike: nobody waits for a peer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnorm.comm import Group
from distnorm.tensor_parallel.checkpoint import from_dcp, shard_layout, to_dcp
from distnorm.topology import Topology
from launch.model import fused_qkv_keys

__all__ = ["META", "TrainState", "find_checkpoint", "load", "read_meta", "save", "step_dir"]

META = "meta.json"
DEEPSPEED_TAG = "deepspeed"
# settings that change what is trained: a resumed run must have the same ones
_MODEL_FREE_KEYS = ("total_steps", "overlap", "grad_sync")  # execution details, or the schedule's length
_DATA_KEYS = ("seed", "batch_size", "corpus_bytes")


@dataclass
class TrainState:
    """What the training loop carries from step to step besides the model and the optimizer."""

    step: int = 0
    """Optimizer steps taken: the next batch is ``batches.batch(step)`` (the data position)."""
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


# --- save ---------------------------------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


Layout = dict[str, tuple[int, int, Group]]


def _dcp_layout(model: nn.Module) -> tuple[Layout, dict[str, int]]:
    """``(layout, fused)``: :func:`shard_layout`, except that each fused q/k/v key (``fused``: key -> 3)
    is stored as its ``[3, rows / 3, ...]`` view sharded along dim 1, which is the same at every TP degree."""
    layout, fused = dict(shard_layout(model)), fused_qkv_keys(model)
    for key, blocks in fused.items():
        if key in layout:
            dim, full, group = layout[key]
            assert dim == 0, (key, dim)  # column-parallel: rows are split
            layout[key] = (1, full // blocks, group)
    return layout, fused


def _to_dcp(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """``state`` (keyed by state-dict/parameter name, tensors laid out like the parameters) ready for DCP."""
    layout, fused = _dcp_layout(model)
    views = {k: v.view(fused[k], -1, *v.shape[1:]) if k in fused and v.dim() > 0 else v for k, v in state.items()}
    return to_dcp(views, {k: layout[k] for k, v in views.items() if k in layout and v.dim() > 0})


def _from_dcp(state: Mapping[str, Any], model: nn.Module, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_dcp` after ``dcp.load``: this rank's tensors, reshaped to ``shapes`` (local)."""
    layout, fused = _dcp_layout(model)
    local = from_dcp(state, layout)
    return {k: v.reshape(shapes[k]) if k in fused and v.dim() > 0 else v for k, v in local.items()}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """``{param name: {state key: tensor}}``, moments of TP-sharded parameters as DTensors."""
    names = _param_names(model)
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    per_param.setdefault(names[id(p)], {})[key] = value
    return _nest({key: _to_dcp({n: s[key] for n, s in per_param.items() if key in s}, model)
                  for key in sorted({k for s in per_param.values() for k in s})})  # same order on every rank


def _nest(by_key: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{state key: {name: t}}`` -> ``{name: {state key: t}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, tensors in by_key.items():
        for name, t in tensors.items():
            out.setdefault(name, {})[key] = t
    return out


def _rng_key(rank: int) -> str:
    return f"rng.rank{rank}"


def _file_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file() and f.name != META}


def save(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any,
         topo: Topology, state: TrainState, info: Mapping[str, Any]) -> None:
    """Write the checkpoint of ``state.step`` to ``path`` (every rank calls it; collective).

    ``engine``: the DeepSpeed engine or None. ``info``: run facts for ``meta.json`` (config, launcher, ...).
    """
    path.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, save_latest=False)
        torch.save(torch.get_rng_state(), path / f"rng_rank{topo.rank}.pt")
        fmt, opt_meta, sched_meta = "deepspeed", None, None
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": _to_dcp(model.state_dict(), model), "optim": _optimizer_tensors(model, optimizer),
                  _rng_key(topo.rank): torch.get_rng_state()}, checkpoint_id=str(path))
        fmt = "dcp"
        opt_meta = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        sched_meta = scheduler.state_dict()
    dist.barrier()  # every rank's files are on disk before rank 0 lists them
    if topo.rank == 0:
        meta = {"format": fmt, "step": state.step, "world_size": topo.world_size, "tp": topo.tp_size,
                "dp": topo.dp_size, **info, "optimizer_param_groups": opt_meta, "scheduler": sched_meta,
                "losses": state.losses, "grad_norms": state.grad_norms, "tokens_per_s": state.tokens_per_s,
                "files": _file_sizes(path)}
        tmp = path / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path / META)  # meta.json appears complete or not at all


# --- resume: find, verify, load -----------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it is a checkpoint (has ``meta.json``), else the latest finished checkpoint
    of the run directory ``path`` (``checkpoints/step_*/meta.json``). ValueError when there is none."""
    p = Path(path)
    if (p / META).is_file():
        return p
    done = sorted(d for d in (p / "checkpoints").glob("step_*") if (d / META).is_file())
    if done:
        return done[-1]
    if any(p.glob("*.distcp")) or (p / DEEPSPEED_TAG).is_dir():
        raise ValueError(f"--resume {str(p)!r}: {str(p / META)!r} is missing: the save did not finish; "
                         f"resume from an earlier checkpoint")
    raise ValueError(f"--resume {str(p)!r}: not a checkpoint (no {META}) nor a run directory with finished "
                     f"checkpoints (no checkpoints/step_*/{META})")


def _keys_in_file(path: Path, relative: str) -> list[str]:
    """The DCP keys whose bytes live in ``relative`` (from ``.metadata``; [] when unreadable)."""
    try:
        import torch.distributed.checkpoint as dcp

        md = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception:  # noqa: BLE001 - a broken .metadata is reported by the size check itself
        return []
    return sorted({index.fqn for index, info in (md.storage_data or {}).items() if info.relative_path == relative})


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of the checkpoint ``path``, after checking every file it lists is there, whole."""
    meta_path = path / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {str(meta_path)!r}: unreadable ({exc})") from None
    for key in ("format", "step", "world_size", "tp", "files", "config"):
        if key not in meta:
            raise ValueError(f"checkpoint {str(meta_path)!r}: key {key!r} is missing")
    for relative, size in meta["files"].items():
        f = path / relative
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            keys = _keys_in_file(path, relative) if relative.endswith(".distcp") else []
            held = f"; it holds {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}" if keys else ""
            what = "is missing" if actual is None else f"is truncated or changed: {actual} bytes, {META} records {size}"
            raise ValueError(f"checkpoint file {str(f)!r} {what}{held}")
    return meta


def _check_settings(meta: Mapping[str, Any], config: Mapping[str, Any], where: Path) -> None:
    """The model and the data stream of the checkpoint are this run's (``config``: the run's config as a dict)."""
    saved = meta["config"]
    pairs = [(f"config.{k}", saved.get(k), config.get(k)) for k in _DATA_KEYS]
    pairs += [(f"config.model.{k}", saved.get("model", {}).get(k), v)
              for k, v in config["model"].items() if k not in _MODEL_FREE_KEYS]
    for key, old, new in pairs:
        if old != new:
            raise ValueError(f"checkpoint {str(where / META)!r}: {key}={old!r}, but this run has {new!r}; "
                             f"resume needs the same model and data (or start a new run)")


def _check_dcp_keys(path: Path, want: Mapping[str, Any]) -> None:
    """Every key of ``want`` (flattened DCP keys -> tensor/DTensor) is in the checkpoint with the same global shape."""
    import torch.distributed.checkpoint as dcp

    where = str(path / ".metadata")
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - any failure to read it is a broken checkpoint
        raise ValueError(f"checkpoint file {where!r} is unreadable: {type(exc).__name__}: {exc}") from None
    for key, value in want.items():
        if key not in saved:
            raise ValueError(f"checkpoint {where!r} has no key {key!r}, which this model needs; was it saved "
                             f"by another model?")
        size = tuple(getattr(saved[key], "size", ()))
        if size != tuple(value.shape):
            raise ValueError(f"checkpoint {where!r}: key {key!r} has shape {list(size)}, this model needs "
                             f"{list(value.shape)}")
    extra = sorted(k for k in saved if k.startswith("model.") and k not in want)
    if extra:
        raise ValueError(f"checkpoint {where!r} has key {extra[0]!r}, which this model does not have")


def _optimizer_template(path: Path, model: nn.Module) -> dict[str, dict[str, Any]]:
    """Tensors for ``dcp.load`` to fill with the saved optimizer state: one per saved ``optim.<name>.<key>``,
    shaped (and, for moments of sharded parameters, sharded) like this model's parameter."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params = dict(model.named_parameters())
    per_key: dict[str, dict[str, torch.Tensor]] = {}
    for flat, item in md.items():
        if not flat.startswith("optim."):
            continue
        name, _, key = flat[len("optim."):].rpartition(".")
        if name not in params:
            raise ValueError(f"checkpoint {str(path / '.metadata')!r} has key {flat!r}: no parameter {name!r} "
                             f"in this model")
        p, dtype = params[name], item.properties.dtype  # type: ignore[union-attr]
        per_key.setdefault(key, {})[name] = (torch.zeros_like(p, dtype=dtype) if len(item.size) > 0  # type: ignore[union-attr]
                                             else torch.zeros((), dtype=dtype))
    return _nest({key: _to_dcp(per_key[key], model) for key in sorted(per_key)})


def _load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, loaded: Mapping[str, Mapping[str, Any]],
                    param_groups: list[dict[str, Any]], where: Path) -> None:
    if len(param_groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint {str(where / META)!r}: optimizer_param_groups has {len(param_groups)} groups, "
                         f"this optimizer {len(optimizer.param_groups)}")
    names = _param_names(model)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    local = {key: _from_dcp({n: s[key] for n, s in loaded.items() if key in s}, model, shapes)
             for key in sorted({k for s in loaded.values() for k in s})}
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups, index = [], 0
    for group, saved in zip(optimizer.param_groups, param_groups, strict=True):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            entry = {key: tensors[name] for key, tensors in local.items() if name in tensors}
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        groups.append({**saved, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load(path: Path, meta: Mapping[str, Any], *, config: Mapping[str, Any], model: nn.Module,
         optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any, topo: Topology) -> TrainState:
    """Restore the checkpoint ``path`` (``meta`` from :func:`read_meta`) into this run; every rank calls it.

    Returns the loop state to continue from. ValueError, naming the file and key, for a checkpoint
    of another model, data stream, format, or (DeepSpeed) shape.
    """
    _check_settings(meta, config, path)
    fmt = "deepspeed" if engine is not None else "dcp"
    if meta["format"] != fmt:
        raise ValueError(f"checkpoint {str(path / META)!r}: format={meta['format']!r} was saved "
                         f"{'with' if meta['format'] == 'deepspeed' else 'without'} --deepspeed; this run "
                         f"{'uses' if fmt == 'deepspeed' else 'does not use'} DeepSpeed")
    same_shape = (meta["world_size"], meta["tp"]) == (topo.world_size, topo.tp_size)
    if engine is not None:
        if not same_shape or meta.get("zero_stage") != engine.zero_optimization_stage():
            raise ValueError(
                f"checkpoint {str(path / META)!r}: world_size={meta['world_size']}, tp={meta['tp']}, "
                f"zero_stage={meta.get('zero_stage')}, but this run has world_size={topo.world_size}, "
                f"tp={topo.tp_size}, zero_stage={engine.zero_optimization_stage()}: a DeepSpeed checkpoint "
                f"resumes at the shape and ZeRO stage it was saved with (rank {topo.rank})")
        loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if loaded is None:
            raise ValueError(f"checkpoint {str(path / DEEPSPEED_TAG)!r}: DeepSpeed could not load it (rank {topo.rank})")
        torch.set_rng_state(torch.load(path / f"rng_rank{topo.rank}.pt"))
    else:
        import torch.distributed.checkpoint as dcp

        model_state = model.state_dict()
        want: dict[str, Any] = {"model": _to_dcp(model_state, model), "optim": _optimizer_template(path, model)}
        flat_model = {f"model.{k}": v for k, v in want["model"].items()}
        _check_dcp_keys(path, flat_model)
        rng_key = _rng_key(topo.rank)
        if same_shape:  # at another shape, rank r's generator belonged to another role: keep the seed's
            want[rng_key] = torch.get_rng_state()
        dcp.load(want, checkpoint_id=str(path))
        model.load_state_dict(_from_dcp(want["model"], model, {k: v.shape for k, v in model_state.items()}))
        _load_optimizer(optimizer, model, want["optim"], meta["optimizer_param_groups"], path)
        scheduler.load_state_dict(meta["scheduler"])
        if same_shape:
            torch.set_rng_state(want[rng_key])
    return TrainState(step=int(meta["step"]), losses=list(meta["losses"]), grad_norms=list(meta["grad_norms"]),
                      tokens_per_s=list(meta["tokens_per_s"]))
