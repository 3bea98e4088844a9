"""Train the tiny distnorm GPT: one script for every launcher.

    python launch/train.py                                                    # world of 1
    torchrun --nproc-per-node 4 launch/train.py --tp 2                        # TP=2 x DP=2
    deepspeed --num_gpus 4 launch/train.py --deepspeed configs/deepspeed_zero1.json --tp 2
    mpirun -np 4 python launch/train.py --tp 2                                # mpi4py bootstrap
    python launch/train.py --save-every 50                                    # checkpoints
    torchrun --nproc-per-node 2 launch/train.py --resume runs/tiny_gpt/<run id>   # resume, any shape

Configuration: ``configs/tiny_gpt.toml`` (``--config``), then command-line overrides. The model
weights and the data order depend only on the seed and the global batch, not on the launcher or
the TP x DP shape, so the same seed gives the same losses everywhere (to round-off). Gradients are
clipped to ``--grad-clip`` (global norm over TP x DP, ``distnorm.clip_grad_norm_``; under DeepSpeed
its ``gradient_clipping``, which then computes the same norm) under every launcher.

Each run writes its own directory ``<out_dir>/<name>/<run id>/`` (printed at the start and the
end; nothing is ever overwritten): ``metrics.json``, ``loss.png`` and ``checkpoints/step_<N>/``
(``launch/checkpoint.py``). Rank 0 shows a progress bar on a terminal and plain ``step N ...`` log
lines otherwise. A bad configuration is one ``train.py: error: ...`` line naming where the value
came from (the command line or the config file) and exit code 2, on every rank before any rank
waits for another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

if __package__ in (None, ""):  # `python launch/train.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import nn

import distnorm as dn
from distnorm import comm
from distnorm.config import convert_field, from_dict
from distnorm.topology import Topology
from launch import checkpoint
from launch.checkpoint import TrainState
from launch.data import Batches, load_corpus
from launch.freeze import check_freeze_config, freeze_before_resume, freeze_for_training
from launch.model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny_gpt.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A training run (top level of the TOML config; ``[model]`` is :class:`launch.model.ModelConfig`)."""

    name: str = "tiny_gpt"
    """Run name: outputs go to ``<out_dir>/<name>/<run id>/``."""
    run_id: str = ""
    """This run's directory name under ``<out_dir>/<name>/``; empty: ``<date>-<time>-<random>``. An
    existing directory is an error (nothing is overwritten)."""
    seed: int = 1234
    steps: int = 200
    tp: int = 1
    """Tensor-parallel degree; must divide the world size."""
    batch_size: int = 16
    """Global sequences per step, split over the DP ranks."""
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm (over TP x DP, as one device would compute it) to this; 0 = off.
    1.0 is DeepSpeed's default ``gradient_clipping``."""
    save_every: int = 0
    """Save a checkpoint every this many steps and after the last step; 0 = never."""
    stop_after: int = 0
    """Stop after this many steps of the ``steps``-long schedule and save a checkpoint there (run 20 of
    30 steps now, ``--resume`` the other 10 later); 0 = run to ``steps``."""
    corpus_bytes: int = 1 << 20
    log_every: int = 20
    out_dir: str = "runs"
    overlap: bool = False
    """Fused reduce-scatter + residual + RMSNorm + all-gather (``distnorm.overlap``, TokenWeave's op);
    needs ``model.norm = "rmsnorm"`` and ``placement = "pre"``. Also on with the DeepSpeed section's
    ``overlap.enabled``."""
    progress: bool | None = None
    """tqdm progress bar on rank 0; unset: only when stderr is a terminal (plain log lines otherwise)."""
    freeze_norms_at: int = 0
    """Freeze the norms after this many steps (``distnorm.freeze_norms``: LayerNorm/RMSNorm with a
    calibrated fixed 1/σ) and train on; 0 = never. See ``launch/freeze.py``."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for its peers (``init_distributed(timeout=)``): a rank that dies
    or stops makes the others exit with an error after at most this long, instead of hanging."""
    model: ModelConfig = field(default_factory=ModelConfig)


# command-line flag -> (config key path, type)
_OVERRIDES: dict[str, tuple[str, type]] = {
    "name": ("name", str), "seed": ("seed", int), "steps": ("steps", int), "tp": ("tp", int),
    "batch_size": ("batch_size", int), "lr": ("lr", float), "out_dir": ("out_dir", str),
    "log_every": ("log_every", int), "corpus_bytes": ("corpus_bytes", int),
    "d_model": ("model.d_model", int), "n_layers": ("model.n_layers", int), "n_heads": ("model.n_heads", int),
    "seq_len": ("model.seq_len", int), "norm": ("model.norm", str), "placement": ("model.placement", str),
    "grad_sync": ("model.grad_sync", str), "timeout_s": ("timeout_s", float), "grad_clip": ("grad_clip", float),
    "save_every": ("save_every", int), "run_id": ("run_id", str),
    "stop_after": ("stop_after", int),
    "freeze_norms_at": ("freeze_norms_at", int),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # `--step 10` is an error, not `--steps 10`
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML run config (default: %(default)s)")
    p.add_argument("--deepspeed", metavar="JSON", default=None, help="train with DeepSpeed using this config")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue from a checkpoint directory, or from the latest checkpoint of a run directory")
    for flag, (_, tp) in _OVERRIDES.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=tp, default=None)
    p.add_argument("--layer-norm-scaling", dest="layer_norm_scaling", action=argparse.BooleanOptionalAction,
                   default=None, help="LayerNorm Scaling (1/sqrt(layer) on each layer's input norms)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None, help="TokenWeave overlap path")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on rank 0")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK says the same
    return p.parse_args(argv)


def load_train_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, str]]:
    """The TOML file with the command-line overrides applied, and where each set key came from.

    ``sources``: key path (``"steps"``, ``"model.norm"``) -> ``"<file name>"`` or ``"command line --flag"``.
    An unknown key or a bad value raises, naming its source: ``tiny_gpt.toml.model.norm: ...`` for
    the file, ``command line --norm (model.norm): ...`` for a flag.
    """
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"--config: file {str(path)!r} does not exist")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {str(path)!r}: invalid TOML: {exc}") from None
    from_dict(TrainConfig, data, where=path.name)  # the file alone: its errors name the file
    sources = {k: path.name for k, v in data.items() if not isinstance(v, dict)}
    sources.update({f"model.{k}": path.name for k in data.get("model", {})})
    flags = {**{k: (v, getattr(args, k)) for k, (v, _) in _OVERRIDES.items()},
             "layer_norm_scaling": ("model.layer_norm_scaling", args.layer_norm_scaling),
             "overlap": ("overlap", args.overlap), "progress": ("progress", args.progress)}
    for flag, (key_path, value) in flags.items():
        if value is None:
            continue
        where = f"command line --{flag.replace('_', '-')} ({key_path})"
        table = data
        *parents, leaf = key_path.split(".")
        for parent in parents:
            table = table.setdefault(parent, {})
        table[leaf] = convert_field(TrainConfig, key_path, value, where=where)
        sources[key_path] = f"command line --{flag.replace('_', '-')}"
    return from_dict(TrainConfig, data, where=path.name), sources


def _env_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _check(cfg: TrainConfig, sources: dict[str, str] | None = None) -> None:
    """Values the types allow but the trainer does not; the error names the value's source."""
    def bad(key: str, expectation: str) -> ValueError:
        origin = (sources or {}).get(key, "default")
        return ValueError(f"{origin}: {key} must be {expectation}, got {getattr(cfg, key)!r} (rank {_env_rank()})")

    for name in ("steps", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise bad(name, ">= 1")
    if cfg.save_every < 0:
        raise bad("save_every", ">= 0 (0: no checkpoints)")
    if not 0 <= cfg.stop_after <= cfg.steps:
        raise bad("stop_after", f"in [0, steps = {cfg.steps}] (0: run to steps)")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise bad("lr", "a finite float > 0")
    if not (cfg.grad_clip >= 0 and math.isfinite(cfg.grad_clip)):
        raise bad("grad_clip", "a finite float >= 0 (0: no clipping)")
    if not (cfg.timeout_s > 0 and math.isfinite(cfg.timeout_s)):
        raise bad("timeout_s", "a finite number of seconds > 0")
    if cfg.run_id and (cfg.run_id in (".", "..") or any(c in cfg.run_id for c in "/\\")):
        raise bad("run_id", "a plain directory name")


def _deepspeed_config(path: str, cfg: TrainConfig, tp_from_cli: bool) -> tuple[dict[str, Any], int]:
    """The DeepSpeed dict (batch and clipping keys filled in from the run config) and the TP degree to use."""
    from distnorm.integrations.deepspeed import SECTION, load_config

    ds, section = load_config(path)
    tp = cfg.tp if tp_from_cli or SECTION not in ds or "tp_size" not in ds[SECTION] else section.tp_size
    ds = {**ds, SECTION: {**ds.get(SECTION, {}), "tp_size": tp}}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp == 0:  # else init_distributed reports the bad tp
        local = cfg.batch_size // (world // tp)
        for key, want, ours in (("train_micro_batch_size_per_gpu", local, f"batch_size={cfg.batch_size}, dp={world // tp}"),
                                ("gradient_accumulation_steps", 1, "one micro-batch per step"),
                                ("train_batch_size", cfg.batch_size, f"batch_size={cfg.batch_size}"),
                                ("gradient_clipping", cfg.grad_clip, f"grad_clip={cfg.grad_clip}; set --grad-clip")):
            if key in ds and ds[key] != want:
                raise ValueError(f"{Path(path).name}: {key}={ds[key]!r} disagrees with the run config "
                                 f"({ours}: expected {want!r}) (rank {_env_rank()})")
        ds.setdefault("train_micro_batch_size_per_gpu", local)
        ds.setdefault("gradient_accumulation_steps", 1)
        ds["gradient_clipping"] = cfg.grad_clip  # DeepSpeed clips at 1.0 when the key is absent
    return ds, tp


def average_over_dp(model: nn.Module, dp_group: dist.ProcessGroup | None) -> None:
    """Data parallelism without DDP: average every gradient over ``dp_group`` in one flat all-reduce
    per dtype (what DDP's buckets do, minus the overlap with backward).

    Why not DDP: on gloo/CPU, freeing a DDP model at exit can deadlock in torch 2.13 (the Reducer's
    destructor joins a gloo worker thread while holding the GIL that thread is waiting for); the
    demo hung at exit under torchrun and mpirun. The tiny model's backward has nothing to overlap.
    Collectives: 1 all-reduce per parameter dtype (4 B per parameter for float32); none for DP == 1.
    """
    world = comm.group_size(dp_group)
    if world == 1:
        return
    buckets: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            buckets.setdefault(p.dtype, []).append(p)
    for params in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        comm.all_reduce_(flat, dp_group).div_(world)
        offset = 0
        for p in params:
            g = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def _lr_lambda(cfg: TrainConfig) -> Any:
    """Linear warmup, then cosine decay to 10 % of ``lr`` at the last step."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="loss (nats/char)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _open_run_dir(cfg: TrainConfig, topo: Topology) -> Path:
    """Rank 0 creates ``<out_dir>/<name>/<run id>/`` (never an existing one) and every rank learns its path.

    Collectives: 1 all-gather of a small object over the world (none at world 1)."""
    outcome: str | None = None
    if topo.rank == 0:
        parent = Path(cfg.out_dir) / cfg.name
        for _ in range(100):
            run_id = cfg.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            try:
                parent.mkdir(parents=True, exist_ok=True)
                (parent / run_id).mkdir()
                outcome = str(parent / run_id)
                break
            except FileExistsError:
                if cfg.run_id:
                    outcome = (f"!run_id: run directory {str(parent / run_id)!r} already exists; nothing is "
                               f"overwritten: choose another --run-id or leave it unset")
                    break
            except OSError as exc:
                outcome = f"!out_dir: cannot create a run directory under {str(parent)!r}: {exc}"
                break
    outcome = comm.all_gather_object(outcome, dist.group.WORLD)[0]
    assert outcome is not None
    if outcome.startswith("!"):
        raise ValueError(f"{outcome[1:]} (rank {topo.rank})")
    return Path(outcome)


def _build(cfg: TrainConfig, topo: Topology, deepspeed_config: dict[str, Any] | None) -> tuple[Any, ...]:
    """``(mcfg, model, batches, optimizer, scheduler, engine)`` for this rank; ``engine`` is None without DeepSpeed."""
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg.corpus_bytes)
    section_overlap = bool(((deepspeed_config or {}).get("distnorm") or {}).get("overlap", {}).get("enabled", False))
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or corpus.vocab_size, total_steps=cfg.steps,
                               overlap=cfg.overlap or section_overlap)
    stats_group = dist.group.WORLD if topo.world_size > 1 else None  # see train()
    model: nn.Module = GPT(mcfg, tp_group=topo.tp_group, stats_group=stats_group, seed=cfg.seed).to(topo.device)
    batches = Batches(corpus, seq_len=mcfg.seq_len, global_batch=cfg.batch_size, dp_size=topo.dp_size,
                      dp_rank=topo.dp_rank, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    engine: Any = None
    if deepspeed_config is not None:
        if mcfg.grad_sync == "deferred":
            raise ValueError(f"model.grad_sync='deferred' is not supported with --deepspeed (rank {topo.rank})")
        from distnorm.integrations import deepspeed as ds_integration

        # initialize() marks the TP-sharded parameters, so DeepSpeed's gradient_clipping uses dn.grad_norm's norm
        engine, _, _, _ = ds_integration.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config, topology=topo)
    return mcfg, model, batches, optimizer, scheduler, engine


def _train_step(cfg: TrainConfig, topo: Topology, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                engine: Any, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """One optimizer step; returns this rank's loss and the global gradient norm before clipping."""
    norm: Any
    if engine is not None:
        loss = engine(idx, targets)
        engine.backward(loss)
        # DeepSpeed clips inside step(); ZeRO-1..3 report that norm, ZeRO-0 (no ZeRO) does not: compute it
        norm = dn.grad_norm(engine.module, topo) if engine.zero_optimization_stage() == 0 else None
        engine.step()
        if norm is None:
            norm = engine.get_global_grad_norm()
        return loss, None if norm is None else float(norm)
    loss = model(idx, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.model.grad_sync == "deferred":
        dn.tensor_parallel.sync_sequence_parallel_grads(model)
    average_over_dp(model, topo.dp_group)
    norm = dn.clip_grad_norm_(model, cfg.grad_clip, topo) if cfg.grad_clip > 0 else dn.grad_norm(model, topo)
    optimizer.step()
    scheduler.step()
    return loss, float(norm)


def train(cfg: TrainConfig, deepspeed_config: dict[str, Any] | None = None, tp: int | None = None, *,
          resume: str | None = None) -> dict[str, Any]:
    """Run the training loop on this rank; rank 0 returns (and writes) the metrics.

    ``resume``: a checkpoint directory (or a run directory: its latest checkpoint) to continue from.
    """
    tp = cfg.tp if tp is None else tp
    topo: Topology = dn.init_distributed(tp=tp, timeout=timedelta(seconds=cfg.timeout_s))
    if topo.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.world_size))
    ckpt_path = checkpoint.find_checkpoint(resume) if resume is not None else None
    ckpt_meta = checkpoint.read_meta(ckpt_path) if ckpt_path is not None else None
    end = cfg.stop_after or cfg.steps
    if ckpt_meta is not None and ckpt_meta["step"] >= end:
        raise ValueError(f"--resume: the checkpoint is at step {ckpt_meta['step']}, the run ends at step {end} "
                         f"(steps={cfg.steps}, stop_after={cfg.stop_after}): nothing to train (rank {topo.rank})")
    run_dir = _open_run_dir(cfg, topo)
    is_main = topo.rank == 0
    say = (lambda s: print(s, flush=True)) if is_main else (lambda s: None)
    say(f"run {run_dir.name}: {run_dir}")
    mcfg, model, batches, optimizer, scheduler, engine = _build(cfg, topo, deepspeed_config)
    launcher = "deepspeed" if engine is not None else topo.launcher
    config_dict = {**dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}
    state = TrainState()
    # the demo's statistics-pooling norms (and a freeze's calibration) span every rank
    stats_group = dist.group.WORLD if topo.world_size > 1 else None

    def batch_on_device(step: int) -> list[torch.Tensor]:
        return [t.to(topo.device) for t in batches.batch(step)]

    if ckpt_path is not None and ckpt_meta is not None:
        # a run resumed after its freeze step needs the frozen modules for the checkpoint's keys
        freeze_before_resume(model, ckpt_meta["step"], cfg.freeze_norms_at, batch_on_device, group=stats_group,
                             log=say)
        state = checkpoint.load(ckpt_path, ckpt_meta, config=config_dict, model=model, optimizer=optimizer,
                                scheduler=scheduler, engine=engine, topo=topo)
        say(f"resumed from {ckpt_path} at step {state.step} (saved at tp={ckpt_meta['tp']} "
            f"dp={ckpt_meta['world_size'] // ckpt_meta['tp']}, {ckpt_meta['format']})")
    info = {"run_id": run_dir.name, "launcher": launcher, "config": config_dict,
            "zero_stage": engine.zero_optimization_stage() if engine is not None else None}

    bar: Any = None
    if is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc=f"{cfg.name} tp={topo.tp_size} dp={topo.dp_size}",
                   dynamic_ncols=True)
    log = bar.write if bar is not None else say
    tokens_per_step = cfg.batch_size * mcfg.seq_len
    start_step, start = state.step, time.perf_counter()
    for step in range(state.step, end):
        freeze_for_training(model, step, cfg.freeze_norms_at, batch_on_device, group=stats_group, log=log)
        t0 = time.perf_counter()
        idx, targets = batches.batch(step)
        loss, norm = _train_step(cfg, topo, model, optimizer, scheduler, engine,
                                 idx.to(topo.device), targets.to(topo.device))
        # the loss of the global batch: mean over DP ranks (each already summed over its TP group)
        global_loss = comm.all_reduce_(loss.detach().float().reshape(1).clone(), topo.dp_group) / topo.dp_size
        state.step = step + 1
        state.losses.append(float(global_loss))
        state.grad_norms.append(norm)
        state.tokens_per_s.append(tokens_per_step / (time.perf_counter() - t0))
        if not math.isfinite(state.losses[-1]):
            raise FloatingPointError(f"loss is {state.losses[-1]} at step {step + 1} (rank {topo.rank})")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}", tok_s=f"{state.tokens_per_s[-1]:.0f}")
        if step == start_step or state.step % cfg.log_every == 0 or state.step == end:
            grad = "" if norm is None else f"  grad_norm {norm:.3f}"
            log(f"step {state.step:5d}  loss {state.losses[-1]:.4f}{grad}  tokens/s {state.tokens_per_s[-1]:.0f}")
        last = state.step == end
        if (cfg.save_every and (state.step % cfg.save_every == 0 or last)) or (last and cfg.stop_after):
            path = checkpoint.step_dir(run_dir, state.step)
            checkpoint.save(path, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine, topo=topo,
                            state=state, info=info)
            log(f"checkpoint: {path}")
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    metrics: dict[str, Any] = {}
    if is_main:
        losses = state.losses
        metrics = {
            "name": cfg.name, "run_id": run_dir.name, "launcher": launcher, "world_size": topo.world_size,
            "tp": topo.tp_size, "dp": topo.dp_size, "steps": cfg.steps, "start_step": start_step,
            "resumed_from": str(ckpt_path) if ckpt_path is not None else None, "losses": losses,
            "grad_norms": state.grad_norms, "grad_clip": cfg.grad_clip, "tokens_per_s": state.tokens_per_s,
            "first_loss": losses[0], "final_loss": losses[-1], "elapsed_s": elapsed,
            "mean_tokens_per_s": tokens_per_step * (end - start_step) / elapsed, "config": config_dict,
            "deepspeed": deepspeed_config,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        _plot(losses, run_dir / "loss.png", f"{cfg.name}: {mcfg.norm}/{mcfg.placement}, tp={topo.tp_size} dp={topo.dp_size}")
        log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[-1] / losses[0]:.0%} of the first) in {elapsed:.1f} s; "
            f"metrics: {run_dir / 'metrics.json'}; plot: {run_dir / 'loss.png'}")
        log(f"run {run_dir.name}: {run_dir}")
    dn.topology.destroy()
    return metrics


def _error(exc: Exception) -> int:
    msg = str(exc) if "(rank " in str(exc) else f"{exc} (rank {_env_rank()})"
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, sources = load_train_config(args)
        _check(cfg, sources)
        ds_config, tp = None, cfg.tp
        if args.deepspeed is not None:
            ds_config, tp = _deepspeed_config(args.deepspeed, cfg, tp_from_cli=args.tp is not None)
        check_freeze_config(cfg.freeze_norms_at, steps=cfg.steps, norm=cfg.model.norm, overlap=cfg.overlap,
                            zero_stage=((ds_config or {}).get("zero_optimization") or {}).get("stage"), rank=_env_rank())
    except (ValueError, TypeError) as exc:
        # the configuration is the same on every rank and is checked before any collective: every
        # rank exits here, none waits; rank 0 says why
        return _error(exc) if _env_rank() == 0 else 2
    try:
        train(cfg, ds_config, tp, resume=args.resume)
    except (ValueError, TypeError) as exc:  # init_distributed checks tp before the rendezvous, on every rank;
        return _error(exc)                   # a bad checkpoint is refused alike on every rank
    except RuntimeError as exc:  # a peer died or stopped: the collective failed or timed out (timeout_s)
        _error(exc)
        os._exit(1)  # leave at once: the process group's shutdown could wait on the lost peer
    return 0


if __name__ == "__main__":
    sys.exit(main())
