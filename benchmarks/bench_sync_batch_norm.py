"""distnorm.SyncBatchNorm vs torch's SyncBatchNorm algorithm vs local BatchNorm, forward + backward.

Providers, each one training step (forward + backward) of a batch norm on this rank's batch:

* ``distnorm``: :class:`distnorm.SyncBatchNorm` (fwd 1 all-reduce of 2C+1 float64 exact moments,
  bwd 1 all-reduce of 2C);
* ``torch_algo``: a faithful gloo port of ``torch.nn.SyncBatchNorm`` (its kernels are CUDA-only):
  local mean/invstd, all-gather of ``world x [mean, invstd, count]``, host-side filtering of empty
  ranks by boolean indexing, Welford merge, backward all-reduce of ``[sum(dy), sum(dy (x - mu))]``;
  channels must sit on dim 1, so a ``[B, T, C]`` input is transposed and made contiguous first, as
  torch does. Written on ``distnorm.comm`` so its collectives are counted the same way;
* ``local``: ``torch.nn.BatchNorm1d/2d`` on the local batch, no communication (a lower bound).

Real gloo processes (``distnorm.testing.spawn``), one thread each. Shapes are DESIGN's
``(32, 256, 56, 56)`` NCHW and ``(16, 512, 1024)`` [B, T, C] per rank, every dim divided by
``--scale`` (default 4) to fit a 2-core CPU. Reported: median step time (max over ranks),
collectives per step, bytes per step (distnorm's rule: payload handed to the collective) and bytes
received per rank (an all-gather receives world x payload). ``--device cuda`` times the world-1
local path of ``distnorm.SyncBatchNorm`` against ``torch.nn.BatchNorm`` at full shapes instead.

    python benchmarks/bench_sync_batch_norm.py [--worlds 2 4 --scale 4 --steps 20]
    python benchmarks/bench_sync_batch_norm.py --device cuda
    python benchmarks/bench_sync_batch_norm.py --accuracy

Prints a table, writes ``benchmarks/out/bench_sync_batch_norm.json`` and ``.png``. ``--accuracy``
instead measures a FRESH float32 module (running mean 0) on data with std 1 and mean 1e2 / 1e3 /
1e4: max error of output, input gradient and weight gradient against float64, for
``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` (transposed ``[B, T, C]``) on the whole batch and for
distnorm on worlds 1, 2 and 4 (simulated ranks, rank 0 empty); writes
``bench_sync_batch_norm_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distnorm import SyncBatchNorm, comm
from distnorm.comm import count_collectives
from distnorm.testing import spawn

OUT = Path(__file__).resolve().parent / "out"
SHAPES = {"nchw": ((32, 256, 56, 56), 1), "btc": ((16, 512, 1024), -1)}
PROVIDERS = ("distnorm", "torch_algo", "local")


class _TorchSyncBatchNormFn(torch.autograd.Function):
    """torch.nn.modules._functions.SyncBatchNorm with its CUDA kernels written in torch ops."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, eps: float, momentum: float, group: comm.Group) -> torch.Tensor:
        x = x.contiguous()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        if x.numel() > 0:  # torch.batch_norm_stats: Welford mean and invstd
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            invstd = torch.rsqrt(var + eps)
            count = torch.full((1,), x.numel() // c, dtype=mean.dtype)
            combined = torch.cat([mean, invstd, count])
        else:
            combined = torch.zeros(2 * c + 1, dtype=x.dtype)
        gathered = comm.all_gather_uneven(combined.unsqueeze(0), group)  # world x (2C + 1)
        mean_all, invstd_all, count_all = gathered.split(c, dim=1)
        keep = count_all.squeeze(-1) >= 1  # host-side filtering: a sync, shapes depend on data
        mean_all, invstd_all, count_all = mean_all[keep], invstd_all[keep], count_all[keep]
        # torch.batch_norm_gather_stats_with_counts: merge (mean, var, n) per rank
        counts = count_all.view(-1, 1)
        n = counts.sum()
        mean = (mean_all * counts).sum(0) / n
        var_all = invstd_all.pow(-2) - eps
        var = ((var_all + (mean_all - mean).square()) * counts).sum(0) / n
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean * momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)) * momentum)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group = group
        shape = (1, c) + (1,) * (x.dim() - 2)  # torch.batch_norm_elemt
        return (x - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, n = ctx.saved_tensors
        dy = dy.contiguous()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xmu = x - mean.view(shape)  # torch.batch_norm_backward_reduce
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        combined = comm.all_reduce_(torch.cat([sum_dy, sum_dy_xmu]), ctx.group)
        mean_dy, mean_dy_xmu = (combined / n).split(c)
        # torch.batch_norm_backward_elemt
        dx = (dy - mean_dy.view(shape) - xmu * (invstd.square() * mean_dy_xmu).view(shape)) * (invstd * weight).view(shape)
        return dx, grad_weight, grad_bias, None, None, None, None, None


class TorchAlgoSyncBatchNorm(nn.BatchNorm1d):
    """Module around :class:`_TorchSyncBatchNormFn`; ``channel_dim=-1`` transposes like a torch user must."""

    def __init__(self, num_features: int, group: comm.Group, channel_dim: int) -> None:
        super().__init__(num_features)
        self.group, self.channel_dim = group, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x if self.channel_dim == 1 else x.movedim(-1, 1)
        y = _TorchSyncBatchNormFn.apply(x_c, self.weight, self.bias, self.running_mean, self.running_var,
                                        self.eps, self.momentum, self.group)
        return y if self.channel_dim == 1 else y.movedim(1, -1)


class LocalBatchNorm(nn.Module):
    def __init__(self, num_features: int, ndim: int, channel_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features) if ndim == 4 else nn.BatchNorm1d(num_features)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) if self.channel_dim == 1 else self.bn(x.movedim(-1, 1)).movedim(1, -1)


def _scaled(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    return tuple(max(1, s // scale) for s in shape)


def _make(provider: str, c: int, ndim: int, channel_dim: int, group: comm.Group, device: str) -> nn.Module:
    if provider == "distnorm":
        return SyncBatchNorm(c, group=group, channel_dim=channel_dim, device=device)
    if provider == "torch_algo":
        return TorchAlgoSyncBatchNorm(c, group, channel_dim).to(device)
    return LocalBatchNorm(c, ndim, channel_dim).to(device)


def _bench_layout(rank: int, shape: tuple[int, ...], channel_dim: int, warmup: int, steps: int) -> dict:
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(rank)
    x = (2.0 + torch.randn(shape, generator=g)).requires_grad_()
    dy = torch.randn(shape, generator=g)
    c = shape[channel_dim]
    norms = {p: _make(p, c, len(shape), channel_dim, group, "cpu") for p in PROVIDERS}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    counts: dict[str, comm.CollectiveCounts] = {}
    outputs = {}
    for i in range(warmup + steps):
        for provider, norm in norms.items():  # interleaved: a load spike hits every provider alike
            x.grad = None
            dist.barrier(group)
            with count_collectives() as counts[provider]:
                start = time.perf_counter()
                y = norm(x)
                y.backward(dy)
                elapsed = time.perf_counter() - start
            if i >= warmup:
                times[provider].append(elapsed)
            outputs[provider] = (y.detach(), x.grad.clone())
    for a, b in zip(outputs["distnorm"], outputs["torch_algo"]):  # the two algorithms agree
        err = float((a - b).abs().max())
        if not err < 1e-3:
            raise AssertionError(f"distnorm and torch_algo differ by {err:.2e} on rank {rank}")
    result: dict[str, Any] = {p: {"median_s": statistics.median(times[p]), "collectives": counts[p].as_dict()}
                              for p in PROVIDERS}
    # the bare forward collectives on the 2C + 1 payload: what latency-bound steps are made of
    stats = torch.randn(2 * c + 1)
    bare: dict[str, list[float]] = {"all_reduce": [], "all_gather": []}
    for i in range(warmup + steps):
        for kind, fn in (("all_reduce", lambda: comm.all_reduce_(stats.clone(), group)),
                         ("all_gather", lambda: comm.all_gather_uneven(stats.unsqueeze(0), group))):
            dist.barrier(group)
            start = time.perf_counter()
            fn()
            if i >= warmup:
                bare[kind].append(time.perf_counter() - start)
    result["bare_ms"] = {k: 1e3 * statistics.median(v) for k, v in bare.items()}
    return result


def _bench_rank(rank: int, world: int, layouts: list[tuple[tuple[int, ...], int]], warmup: int, steps: int) -> list[dict]:
    torch.set_num_threads(1)
    return [_bench_layout(rank, shape, channel_dim, warmup, steps) for shape, channel_dim in layouts]


def _received(kind: str, nbytes: int, world: int) -> int:
    """Bytes one rank ends up holding: an all-gather returns world x its payload."""
    return nbytes * world if kind == "all_gather" else nbytes


def run_cpu(worlds: list[int], scale: int, warmup: int, steps: int) -> list[dict]:
    layouts = [(_scaled(full, scale), channel_dim) for full, channel_dim in SHAPES.values()]
    rows = []
    for world in worlds:
        per_rank = spawn(world, _bench_rank, world, layouts, warmup, steps, timeout=300)
        for j, (layout, (full, _)) in enumerate(SHAPES.items()):
            for provider in PROVIDERS:
                coll = per_rank[0][j][provider]["collectives"]
                rows.append({
                    "layout": layout, "shape_per_rank": list(layouts[j][0]), "scaled_from": list(full), "world": world,
                    "provider": provider,
                    "ms": 1e3 * max(r[j][provider]["median_s"] for r in per_rank),
                    "collectives": sum(v["count"] for v in coll.values()),
                    "bytes": sum(v["bytes"] for v in coll.values()),
                    "bytes_received": sum(_received(k, v["bytes"], world) for k, v in coll.items()),
                    "kinds": coll,
                    "bare_collective_ms": {k: max(r[j]["bare_ms"][k] for r in per_rank) for k in ("all_reduce", "all_gather")},
                })
    rows.sort(key=lambda r: (r["layout"] != "nchw", r["world"]))
    return rows


def run_cuda(warmup: int, steps: int) -> list[dict]:
    rows = []
    for layout, (shape, channel_dim) in SHAPES.items():
        c = shape[channel_dim]
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(shape, device="cuda", dtype=dtype)
            for provider in ("distnorm", "local"):
                norm = _make(provider, c, len(shape), channel_dim, None, "cuda")
                for _ in range(warmup):
                    norm(x).backward(dy)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(steps):
                    start.record()
                    norm(x).backward(dy)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                rows.append({"layout": layout, "shape_per_rank": list(shape), "world": 1, "dtype": str(dtype),
                             "provider": provider, "ms": statistics.median(times), "collectives": 0, "bytes": 0,
                             "bytes_received": 0, "device": torch.cuda.get_device_name()})
    return rows


def _latency_table(rows: list[dict]) -> str:
    lines = ["bare forward collective on the 2C+1 payload (ms, median, slowest rank):"]
    for r in rows:
        if r["provider"] == "distnorm" and "bare_collective_ms" in r:
            b = r["bare_collective_ms"]
            lines.append(f"  {r['layout']:5} P={r['world']}: all_reduce {b['all_reduce']:.3f}  all_gather {b['all_gather']:.3f}")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    head = f"{'layout':7} {'shape/rank':18} {'world':>5} {'provider':11} {'ms/step':>9} {'coll':>4} {'bytes':>7} {'recv B':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["shape_per_rank"]))
        tag = r["provider"] + (f" {r['dtype'].split('.')[-1]}" if "dtype" in r else "")
        lines.append(f"{r['layout']:7} {shape:18} {r['world']:>5} {tag:11} {r['ms']:>9.3f} {r['collectives']:>4} "
                     f"{r['bytes']:>7} {r['bytes_received']:>7}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["layout"], r["world"], r.get("dtype", "")) for r in rows})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = [next((r["ms"] for r in rows if (r["layout"], r["world"], r.get("dtype", "")) == gk and r["provider"] == p), 0.0)
                for gk in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{lay}\nP={w} {d.split('.')[-1]}" for lay, w, d in groups])
    ax.set_ylabel("fwd+bwd ms / step (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


ACCURACY_SHAPES = {"nchw": ((16, 8, 8, 8), 1), "btc": ((16, 32, 8), -1)}


def _accuracy_rank(rank: int, world: int, x: torch.Tensor, dy: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, ...]:
    from distnorm.testing import split_for_world

    sizes = [x.shape[0]] if world == 1 else [0, *comm.shard_sizes(x.shape[0], world - 1)]  # rank 0 empty
    bn = SyncBatchNorm(x.shape[channel_dim], group=dist.group.WORLD if world > 1 else None, channel_dim=channel_dim)
    xs = split_for_world(x, world, sizes=sizes)[rank].clone().requires_grad_()
    y = bn(xs)
    y.backward(split_for_world(dy, world, sizes=sizes)[rank])
    return y.detach(), xs.grad, bn.weight.grad


def run_accuracy() -> list[dict]:
    from distnorm.functional.reference import batch_norm_ref
    from distnorm.testing import simulate

    rows = []
    for layout, (shape, channel_dim) in ACCURACY_SHAPES.items():
        c = shape[channel_dim]
        for mean in (1e2, 1e3, 1e4):
            g = torch.Generator().manual_seed(0)
            x = (mean + torch.randn(shape, generator=g, dtype=torch.float64)).float()
            dy = torch.randn(shape, generator=g)
            x64, w64 = x.double().requires_grad_(), torch.ones(c, dtype=torch.float64, requires_grad=True)
            y64 = batch_norm_ref(x64, None, None, w64, channel_dim=channel_dim)[0]
            y64.backward(dy.double())
            ref = (y64.detach(), x64.grad, w64.grad)
            torch_bn = (nn.BatchNorm2d if channel_dim == 1 else nn.BatchNorm1d)(c)
            xt = x.clone().requires_grad_()
            yt = torch_bn(xt) if channel_dim == 1 else torch_bn(xt.transpose(1, 2)).transpose(1, 2)
            yt.backward(dy)
            results = {"torch": (yt.detach(), xt.grad, torch_bn.weight.grad)}
            for world in (1, 2, 4):
                outs = simulate(world, _accuracy_rank, world, x, dy, channel_dim, timeout=120)
                results[f"distnorm world {world}"] = (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
                                                      sum(o[2] for o in outs))
            for provider, got in results.items():
                errs = [float((a.double() - b).abs().max()) for a, b in zip(got, ref, strict=True)]
                rows.append({"layout": layout, "mean": mean, "provider": provider, "y": errs[0], "dx": errs[1],
                             "dweight": errs[2]})
    return rows


def _accuracy_table(rows: list[dict]) -> str:
    head = f"{'layout':7} {'mean':>6} {'provider':18} {'y err':>9} {'dx err':>9} {'dW err':>9}"
    lines = [head, "-" * len(head)]
    lines += [f"{r['layout']:7} {r['mean']:>6.0e} {r['provider']:18} {r['y']:>9.1e} {r['dx']:>9.1e} {r['dweight']:>9.1e}"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--scale", type=int, default=4, help="divide every dim of the DESIGN shapes by this (CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--accuracy", action="store_true", help="errors vs float64 of a fresh module at large |mean|")
    args = parser.parse_args()
    if args.accuracy:
        rows = run_accuracy()
        print(_accuracy_table(rows))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_sync_batch_norm_accuracy.json").write_text(json.dumps(rows, indent=1))
        return
    rows = run_cuda(args.warmup, args.steps) if args.device == "cuda" else run_cpu(args.worlds, args.scale, args.warmup, args.steps)
    print(_table(rows))
    if args.device == "cpu":
        print(_latency_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_sync_batch_norm" + ("_cuda" if args.device == "cuda" else "")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(), "torch": torch.__version__,
            "cpus": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    _plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
