"""distnorm's norms where no statistic crosses ranks, against torch's own modules: time and activation memory.

Each case times one training step (forward + backward, fixed output gradient) of a distnorm module
and of torch's module doing the same job, on the same input, in fp32 and bf16, at three shapes:

====================  ====================================================  ==============================================
case                  distnorm                                              torch
====================  ====================================================  ==============================================
layer_norm            ``SequenceParallelLayerNorm(H)``                      ``nn.LayerNorm(H)``
rms_norm              ``SequenceParallelRMSNorm(H)``                        ``nn.RMSNorm(H)``
add_rms_norm          ``distnorm.kernels.add_rms_norm(x, r, w)``            ``h = x + r``; ``nn.RMSNorm(H)(h)``
sharded_layer_norm    ``ShardedLayerNorm(H, group=None)``                   ``nn.LayerNorm(H)``
sharded_rms_norm      ``ShardedRMSNorm(H, group=None)``                     ``nn.RMSNorm(H)``
sync_batch_norm_nchw  ``SyncBatchNorm(C)`` on ``[N, C, H, W]``              ``nn.BatchNorm2d(C)``
sync_batch_norm_btc   ``SyncBatchNorm(C, channel_dim=-1)`` on ``[B, T, C]``  ``nn.BatchNorm1d(C)`` on ``x.transpose(1, 2)``
====================  ====================================================  ==============================================

Timing: one thread, the two providers alternate, each step is repeated until it has run for at
least ``--min-time`` seconds (default 1), the median step is reported (``--clock cpu`` times this
thread's CPU time instead of the wall clock, for a loaded machine). The ratio distnorm / torch is
the figure of merit: the target is <= 1.10.

Activation memory: ``torch.autograd.graph.saved_tensors_hooks`` records what each step's forward
saves for backward; reported are the bytes kept alive beyond the inputs, the outputs and the
parameters, as a multiple of the input's bytes (distnorm: per-row statistics only, ~0.00).

World 2 (``--world2``, real gloo processes, one thread each, always the wall clock):
``ShardedLayerNorm`` and ``ShardedRMSNorm`` on ``[T, H/2]`` shards against the same module with
``group=None`` on the shard plus the all-reduces of their payload (one per direction: LayerNorm
16 + 8 B/token, RMSNorm 4 + 4).

    python benchmarks/bench_local.py [--out benchmarks/out] [--clock wall|cpu] [--world2]
    python benchmarks/bench_local.py --smoke --out /tmp/bench     # tiny shapes, seconds
    python benchmarks/bench_local.py --device cuda --dtypes bf16,fp32   # on a GPU: the issue's shapes, CUDA-synchronised wall clock

Prints a table; writes ``bench_local.json`` and ``bench_local.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distnorm as dn
from distnorm import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 1.10
DEVICE = torch.device("cpu")  # main() sets it; builders create tensors and modules on it (default device)


def _sync() -> None:
    """Wait for the device (a CUDA step is timed end to end, not at launch)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# cases: each builds, for a shape and dtype, one step per provider


@dataclass
class Step:
    """One provider's training step: ``run()`` does forward + backward; ``forward()`` only the forward."""

    forward: Callable[[], Any]
    inputs: list[torch.Tensor]
    params: list[torch.Tensor]
    dy: list[torch.Tensor]

    def run(self) -> None:
        for t in (*self.inputs, *self.params):
            t.grad = None
        out = self.forward()
        if self.dy:  # a step without output gradients is forward-only (a bare collective)
            outs = list(out) if isinstance(out, tuple) else [out]
            torch.autograd.backward(outs, self.dy[: len(outs)])


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _norm_steps(torch_mod: nn.Module, dist_mod: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Step]:
    with torch.no_grad():  # same parameters in both
        for p_t, p_d in zip(torch_mod.parameters(), dist_mod.parameters()):
            p_t.normal_(1.0, 0.1)
            p_d.copy_(p_t)
    xt, xd = _leaf(x), _leaf(x)
    return {"torch": Step(lambda: torch_mod(xt), [xt], list(torch_mod.parameters()), [dy]),
            "distnorm": Step(lambda: dist_mod(xd), [xd], list(dist_mod.parameters()), [dy])}


def _rows(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(shape, generator=g) * 2 + 0.5, torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def case_layer_norm(shape, dtype, *, sharded=False):
    x, dy = _rows(shape, dtype)
    h = shape[-1]
    mod = dn.ShardedLayerNorm(h, dtype=dtype) if sharded else dn.SequenceParallelLayerNorm(h, dtype=dtype)
    return _norm_steps(nn.LayerNorm(h, dtype=dtype), mod, x, dy)


def case_rms_norm(shape, dtype, *, sharded=False):
    x, dy = _rows(shape, dtype)
    h = shape[-1]
    mod = dn.ShardedRMSNorm(h, dtype=dtype) if sharded else dn.SequenceParallelRMSNorm(h, dtype=dtype)
    return _norm_steps(nn.RMSNorm(h, eps=1e-6, dtype=dtype), mod, x, dy)


def case_add_rms_norm(shape, dtype):
    x, dy = _rows(shape, dtype)
    r, dr = _rows(shape, dtype, seed=1)
    h = shape[-1]
    rms = nn.RMSNorm(h, eps=1e-6, dtype=dtype)
    w = _leaf(torch.ones(h, dtype=dtype))
    xt, rt, xd, rd = _leaf(x), _leaf(r), _leaf(x), _leaf(r)

    def eager():
        s = xt + rt
        return rms(s), s

    return {"torch": Step(eager, [xt, rt], list(rms.parameters()), [dy, dr]),
            "distnorm": Step(lambda: kernels.add_rms_norm(xd, rd, w, 1e-6), [xd, rd], [w], [dy, dr])}


def case_sync_batch_norm(shape, dtype, *, channels_last):
    x, dy = _rows(shape, dtype)
    c = shape[-1] if channels_last else shape[1]
    if channels_last:  # [B, T, C]: torch's BatchNorm1d wants channels on dim 1
        bn = nn.BatchNorm1d(c, dtype=dtype)
        mod = dn.SyncBatchNorm(c, channel_dim=-1).to(dtype)
        xt, xd = _leaf(x), _leaf(x)
        return {"torch": Step(lambda: bn(xt.transpose(1, 2)).transpose(1, 2), [xt], list(bn.parameters()), [dy]),
                "distnorm": Step(lambda: mod(xd), [xd], list(mod.parameters()), [dy])}
    return _norm_steps(nn.BatchNorm2d(c, dtype=dtype), dn.SyncBatchNorm(c).to(dtype), x, dy)


# on a GPU the row norms run at the kernel issue's shapes, the batch norms at ResNet/ViT-like ones
GPU_ROWS = [(4096, 4096), (16384, 4096), (8192, 8192), (32768, 8192)]
GPU_SHAPES = {"sync_batch_norm_nchw": [(32, 256, 56, 56), (64, 64, 112, 112)],
              "sync_batch_norm_btc": [(32, 1024, 1024), (16, 4096, 768)]}

CASES: dict[str, tuple[Callable[..., dict[str, Step]], list[tuple[int, ...]], list[tuple[int, ...]]]] = {
    # name: (builder, full shapes, smoke shapes)
    "layer_norm": (case_layer_norm, [(4096, 1024), (1024, 4096), (8192, 768)], [(64, 256)]),
    "rms_norm": (case_rms_norm, [(4096, 1024), (1024, 4096), (8192, 768)], [(64, 256)]),
    "add_rms_norm": (case_add_rms_norm, [(4096, 1024), (1024, 4096), (8192, 768)], [(64, 256)]),
    "sharded_layer_norm": (lambda s, d: case_layer_norm(s, d, sharded=True),
                           [(4096, 1024), (1024, 4096), (8192, 768)], [(64, 256)]),
    "sharded_rms_norm": (lambda s, d: case_rms_norm(s, d, sharded=True),
                         [(4096, 1024), (1024, 4096), (8192, 768)], [(64, 256)]),
    "sync_batch_norm_nchw": (lambda s, d: case_sync_batch_norm(s, d, channels_last=False),
                             [(32, 64, 32, 32), (16, 256, 16, 16), (8, 128, 64, 64)], [(4, 8, 8, 8)]),
    "sync_batch_norm_btc": (lambda s, d: case_sync_batch_norm(s, d, channels_last=True),
                            [(8, 512, 512), (4, 1024, 1024), (32, 128, 256)], [(2, 16, 32)]),
}


# ----------------------------------------------------------------------------------------------
# measurement


def _clock(kind: str) -> Callable[[], float]:
    return time.thread_time if kind == "cpu" else time.perf_counter


def time_steps(steps: dict[str, Step], min_time: float, clock: str,
               agree: Callable[[int], int] = lambda n: n) -> dict[str, float]:
    """Median ms per step of each provider; the providers alternate for enough rounds that each runs
    about ``min_time`` s. ``agree`` maps this process's round count to the one every rank uses
    (steps with collectives must run equally often on every rank)."""
    now = _clock(clock)
    first: dict[str, float] = {}
    for name, step in steps.items():  # warm up, and estimate a step
        step.run()
        _sync()
        start = now()
        step.run()
        _sync()
        first[name] = now() - start
    rounds = agree(max(3, int(min_time / max(min(first.values()), 1e-6)) + 1))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync()
            start = now()
            step.run()
            _sync()
            times[name].append(now() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def saved_bytes(step: Step) -> int:
    """Bytes the forward saves for backward beyond its inputs, outputs and parameters (storage-level)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    for t in (*step.inputs, *step.params):
        t.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step.forward()
    outs = list(out) if isinstance(out, tuple) else [out]
    owned = {t.untyped_storage().data_ptr() for t in (*step.inputs, *step.params, *outs)}
    return sum(n for ptr, n in storages.items() if ptr not in owned)


def run_local(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for name in args.cases.split(","):
        builder, full, smoke = CASES[name]
        for dtype_name in args.dtypes.split(","):
            shapes = smoke if args.smoke else full
            if DEVICE.type == "cuda" and not args.smoke:
                shapes = GPU_SHAPES.get(name, GPU_ROWS)
            for shape in shapes:
                steps = builder(shape, DTYPES[dtype_name])
                ms = time_steps(steps, args.min_time, args.clock)
                in_bytes = sum(t.nbytes for t in steps["torch"].inputs)
                saved = {p: saved_bytes(s) / in_bytes for p, s in steps.items()}
                row = {"case": name, "dtype": dtype_name, "shape": list(shape), "torch_ms": ms["torch"],
                       "distnorm_ms": ms["distnorm"], "ratio": ms["distnorm"] / ms["torch"],
                       "torch_saved_x": saved["torch"], "distnorm_saved_x": saved["distnorm"]}
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict[str, Any]) -> str:
    shape = "x".join(map(str, r["shape"]))
    flag = "" if r["ratio"] <= TARGET else "  > target"
    return (f"| {r['case']} | {r['dtype']} | {shape} | {r['torch_ms']:.3f} | {r['distnorm_ms']:.3f} | "
            f"{r['ratio']:.2f}{flag} | {r['torch_saved_x']:.2f} | {r['distnorm_saved_x']:.2f} |")


# ----------------------------------------------------------------------------------------------
# world 2: the sharded norms in real gloo processes


def _world2_rank(rank: int, world: int, cases: list[tuple[str, tuple[int, int], str]], min_time: float,
                 clock: str) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    group = dist.group.WORLD
    out = []

    def agree(rounds: int) -> int:  # every rank runs the largest round count (outside the timed region)
        n = torch.tensor([rounds])
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        return int(n)

    for kind, (tokens, hidden), dtype_name in cases:
        dtype = DTYPES[dtype_name]
        cls = dn.ShardedLayerNorm if kind == "layer_norm" else dn.ShardedRMSNorm
        local_cols = dn.shard_sizes(hidden, world)[rank]
        x, dy = _rows((tokens, local_cols), dtype, seed=rank)
        sharded, local = cls(hidden, group=group, dtype=dtype), cls(local_cols, dtype=dtype)
        xs, xl = _leaf(x), _leaf(x)
        steps = {"sharded": Step(lambda m=sharded, x=xs: m(x), [xs], list(sharded.parameters()), [dy]),
                 "local": Step(lambda m=local, x=xl: m(x), [xl], list(local.parameters()), [dy])}
        ms = time_steps(steps, min_time, clock, agree)
        # the payload: fwd [Σx, Σx²] float64 (LayerNorm) / Σx² fp32; bwd [Σg, Σg·x̂] / Σg·x̂ fp32
        fwd = torch.zeros(tokens, 2 if kind == "layer_norm" else 1,
                          dtype=torch.float64 if kind == "layer_norm" else torch.float32)
        bwd = torch.zeros(tokens, 2 if kind == "layer_norm" else 1)

        def reduce_both(fwd=fwd, bwd=bwd) -> None:
            dist.all_reduce(fwd, group=group)
            dist.all_reduce(bwd, group=group)

        comm_ms = time_steps({"all_reduce": Step(reduce_both, [], [], [])}, min_time, clock, agree)["all_reduce"]
        out.append({"case": f"sharded_{kind}", "dtype": dtype_name, "shape": [tokens, hidden], "world": world,
                    "sharded_ms": ms["sharded"], "local_ms": ms["local"], "allreduce_ms": comm_ms,
                    "ratio": ms["sharded"] / (ms["local"] + comm_ms)})
    return out


def run_world2(args: argparse.Namespace) -> list[dict[str, Any]]:
    from distnorm.testing import spawn

    shapes = [(64, 256)] if args.smoke else [(4096, 1024), (1024, 4096)]
    dtypes = args.dtypes.split(",")[:1] if args.smoke else args.dtypes.split(",")
    cases = [(kind, shape, dt) for kind in ("layer_norm", "rms_norm") for shape in shapes for dt in dtypes]
    # wall clock whatever --clock says: the time a rank waits in an all-reduce is real time, and gloo
    # works in threads that this thread's CPU clock does not see
    per_rank = spawn(2, _world2_rank, 2, cases, args.min_time, "wall", timeout=600)
    rows = []
    for i, row in enumerate(per_rank[0]):  # the slower rank counts
        for other in per_rank[1:]:
            for key in ("sharded_ms", "local_ms", "allreduce_ms"):
                row[key] = max(row[key], other[i][key])
        row["ratio"] = row["sharded_ms"] / (row["local_ms"] + row["allreduce_ms"])
        rows.append(row)
        print(f"| {row['case']} (world 2) | {row['dtype']} | {'x'.join(map(str, row['shape']))} | "
              f"{row['sharded_ms']:.3f} | local {row['local_ms']:.3f} + all-reduces {row['allreduce_ms']:.3f} | "
              f"{row['ratio']:.2f} |", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# output


def plot(rows: list[dict[str, Any]], world2: list[dict[str, Any]], path: Path) -> None:
    """distnorm / torch time per case (bars per shape and dtype), the 1.10 target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['dtype']} {'x'.join(map(str, r['shape']))}" for r in rows]
    labels += [f"{r['case']} (w2)\n{r['dtype']} {'x'.join(map(str, r['shape']))}" for r in world2]
    ratios = [r["ratio"] for r in rows] + [r["ratio"] for r in world2]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels)), 5))
    colors = ["tab:green" if v <= TARGET else "tab:red" for v in ratios]
    ax.bar(range(len(ratios)), ratios, color=colors)
    ax.axhline(TARGET, color="black", lw=0.8, ls="--", label=f"target {TARGET}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("distnorm time / torch time (world 2: / (local + all-reduces))")
    ax.set_title("fwd+bwd, one thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds each provider runs per case")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--world2", action="store_true", help="also time the sharded norms at world 2 (gloo)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, short timers (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU shapes, wall clock synchronised after every step, no --world2")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.min_time = min(args.min_time, 0.01)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        torch.set_default_device(DEVICE)  # the builders' modules and parameters
        args.clock, args.world2 = "wall", False
    print("| case | dtype | shape | torch ms | distnorm ms | distnorm / torch | torch saved / input | "
          "distnorm saved / input |\n|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows = run_local(args)
    world2 = run_world2(args) if args.world2 else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": 1, "clock": args.clock, "device": args.device,
            "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None, "min_time_s": args.min_time, "target": TARGET}
    (out / "bench_local.json").write_text(json.dumps({"meta": meta, "rows": rows, "world2": world2}, indent=1))
    plot(rows, world2, out / "bench_local.png")
    misses = [r for r in rows + world2 if r["ratio"] > TARGET]
    print(f"\n{len(rows) + len(world2)} cases, {len(misses)} above {TARGET}x; wrote {out / 'bench_local.json'}")


if __name__ == "__main__":
    main()
