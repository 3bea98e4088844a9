"""Token-split overlap, forward and backward: unsplit vs woven TP block stacks, measured.

CPU (default): P gloo processes (P = 2 and 4) run a stack of ``ParallelMLPBlock``s (fp32,
``normed_grad="partial"``) through a training step, in both modes. Every collective goes through
a :class:`~distnorm.overlap.SimulatedLink` (``--link-latency-ms``, ``--link-gbps`` bus
bandwidth): the real collective plus the time the modelled link needs, slept out by the waiting
thread -- time that frees the cores, as a NIC would -- so overlap is measurable on 2 cores. Per
mode and P, forward and backward separately (min over interleaved rounds, max over ranks):

* compute: the stack with no link time (host work, real collectives included), unsplit and split;
* comm: the link time injected into the unsplit and the split run;
* unsplit / woven: with the link;
* overlap efficiency = hidden / min(compute, comm), hidden = split compute + split comm - woven;
* split overhead = split compute / unsplit compute - 1;
* the planner's predicted training step (its profile: compute fitted to this run's no-link
  timings, comm = the link's parameters) vs the measured one, unsplit and at its split.

GPU (``--device cuda``, one GPU): the stack is one rank's shard of a TP-8 MLP (bf16) and every
collective is replaced by a stand-in of known duration on a side stream -- a sleep kernel sized
like an 8xH100 NVLink all-reduce of the same bytes (``DeviceProfile()`` defaults: 12 us + bytes /
250 GB/s, TokenWeave's setting). Forward only; reports overlap efficiency, split overhead, the
fused add+RMSNorm's bandwidth, predicted vs measured and whether the step captures in a CUDA graph.

    python benchmarks/bench_overlap.py --link-latency-ms 1 --link-gbps 2   # CPU, P = 2 and 4
    python benchmarks/bench_overlap.py --quick                             # CI smoke (seconds)
    python benchmarks/bench_overlap.py --device cuda                       # one GPU

Writes a table to stdout and ``<out>/bench_overlap_<device>.{json,png}`` (``--out``, default
``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distnorm import comm
from distnorm.overlap import (
    DeviceProfile,
    ParallelMLPBlock,
    SimulatedLink,
    TokenSplitPlan,
    TokenWeaver,
    plan_token_split,
)
from distnorm.overlap.fused import add_rms_norm
from distnorm.overlap.token_split import predict_step_s

OUT = Path(__file__).resolve().parent / "out"
PHASES = ("fwd", "bwd")


def _median_s(fn: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# CPU: real gloo processes, collectives through a modelled link
# --------------------------------------------------------------------------------------------


def _cpu_rank(rank: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    group = dist.group.WORLD
    world = dist.get_world_size()
    return [_cpu_mode(group, world, rank, mode, cfg) for mode in cfg["modes"]]


def _cpu_mode(group: Any, world: int, rank: int, mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    tokens, hidden, layers = cfg["tokens"], cfg["hidden"], cfg["layers"]
    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(hidden, 4 * hidden, group=group, bias=False, generator=gen, normed_grad="partial")
              for _ in range(layers)]
    link = SimulatedLink(latency_s=cfg["link_latency_s"], bus_bytes_per_s=cfg["link_bytes_per_s"])
    barrier_buf = torch.zeros(1)

    def sync() -> None:  # every rank starts each timed phase together (a real collective, off the link)
        comm.all_reduce_(barrier_buf, group)

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1)
        x, residual, dy, dres = (torch.randn(n, hidden, generator=g) for _ in range(4))
        if mode == "reduce_scatter":  # this rank's token shard, as the fused op holds it
            lo, size = comm.shard_offsets(n, world)[rank], comm.shard_sizes(n, world)[rank]
            residual, dres = residual[lo:lo + size], dres[lo:lo + size]
        return x.requires_grad_(), residual.requires_grad_(), dy / world, dres  # dy: this rank's partial

    def step(weaver: TokenWeaver, n: int) -> Callable[[], dict[str, float]]:
        x, residual, dy, dres = inputs(n)

        def run() -> dict[str, float]:
            sync()
            link.reset()
            t0 = time.perf_counter()
            y, r = weaver(x, residual)
            t1 = time.perf_counter()
            fwd_link = link.injected_s
            sync()
            t2 = time.perf_counter()
            torch.autograd.backward((y, r), (dy, dres))
            t3 = time.perf_counter()
            return {"fwd": t1 - t0, "bwd": t3 - t2, "fwd_link": fwd_link, "bwd_link": link.injected_s - fwd_link}

        return run

    def weaver(plan: TokenSplitPlan | None, *, with_link: bool) -> TokenWeaver:
        return TokenWeaver(blocks, group, plan, mode=mode, normed_grad="partial",
                           wrap_launcher=link.wrap if with_link else None)

    def rounds(variants: dict[str, Callable[[], dict[str, float]]]) -> dict[str, dict[str, float]]:
        """Interleaved: each round runs every variant once (drift and neighbours' load hit all
        alike); per quantity the minimum over rounds (the least disturbed run), then the maximum
        over ranks (the slowest rank sets a step's time, and every rank must plan alike)."""
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for i in range(cfg["iters"] + 1):
            for name, fn in variants.items():
                result = fn()
                if i:  # round 0 warms up
                    samples[name].append(result)
        keys = [(name, q) for name in variants for q in samples[name][0]]
        local = torch.tensor([min(s[q] for s in samples[name]) for name, q in keys], dtype=torch.float64)
        comm.all_reduce_(local, group, op="max")
        out: dict[str, dict[str, float]] = {name: {} for name in variants}
        for (name, q), v in zip(keys, local.tolist(), strict=True):
            out[name][q] = v
        return out

    # 1. host work alone (no link time) at three sizes: the planner's compute model
    sizes = sorted({tokens // 3, tokens // 2, tokens})
    cal = rounds({str(n): step(weaver(None, with_link=False), n) for n in sizes})
    profile = DeviceProfile.calibrate(
        compute=[(n, cal[str(n)]["fwd"] / layers) for n in sizes],
        comm=[(b, cfg["link_latency_s"] + b / link.all_reduce_bytes_per_s(world)) for b in (1e3, 1e6)],
        flops_per_token=16 * hidden * hidden / world, tile_tokens=cfg["tile"],
        backward_compute_ratio=cal[str(tokens)]["bwd"] / cal[str(tokens)]["fwd"])
    plan_args = dict(device_profile=profile, num_layers=layers, dtype=torch.float32, mode=mode, training=True,
                     normed_grad="partial")
    plan = plan_token_split(tokens, hidden, world, max_chunks=3, **plan_args)  # type: ignore[arg-type]
    if not plan.split:  # measure a split anyway (halves; thirds in reduce_scatter mode): the table says why
        chunks = comm.shard_sizes(tokens, 2 if mode == "allreduce" else 3)
        plan = TokenSplitPlan(num_tokens=tokens, first=chunks[0], chunks=tuple(chunks) if len(chunks) > 2 else (),
                              reason=f"planner declined ({plan.reason}); {'+'.join(map(str, chunks))} measured")
    # 2. the four variants
    m = rounds({
        "compute": step(weaver(None, with_link=False), tokens),
        "compute_split": step(weaver(plan, with_link=False), tokens),
        "unsplit": step(weaver(None, with_link=True), tokens),
        "woven": step(weaver(plan, with_link=True), tokens),
    })
    row: dict[str, Any] = {"mode": mode, "world": world, "tokens": tokens, "hidden": hidden, "layers": layers,
                           "link_latency_s": cfg["link_latency_s"], "link_bytes_per_s": cfg["link_bytes_per_s"]}
    for ph in PHASES:
        compute, compute_split = m["compute"][ph], m["compute_split"][ph]
        comm_unsplit, comm_split = m["unsplit"][f"{ph}_link"], m["woven"][f"{ph}_link"]
        hidden_s = compute_split + comm_split - m["woven"][ph]
        row[ph] = {"compute_s": compute, "compute_split_s": compute_split, "comm_s": comm_unsplit,
                   "comm_split_s": comm_split, "unsplit_s": m["unsplit"][ph], "woven_s": m["woven"][ph],
                   "hidden_s": hidden_s, "efficiency": hidden_s / min(compute_split, comm_split),
                   "split_overhead": compute_split / compute - 1.0}
    chunks = list(plan.halves)
    predict = {k: v for k, v in plan_args.items() if k != "dtype"}
    fpt = 16 * hidden * hidden / world
    row["plan"] = {"chunks": chunks, "reason": plan.reason,
                   "predicted_unsplit_s": predict_step_s([tokens], hidden, world, flops_per_token=fpt,
                                                         itemsize=4, **predict),  # type: ignore[arg-type]
                   "predicted_split_s": predict_step_s(chunks, hidden, world, flops_per_token=fpt,
                                                       itemsize=4, **predict),  # type: ignore[arg-type]
                   "measured_unsplit_s": m["unsplit"]["fwd"] + m["unsplit"]["bwd"],
                   "measured_split_s": m["woven"]["fwd"] + m["woven"]["bwd"]}
    row["profile"] = {f: getattr(profile, f) for f in ("flops_per_s", "compute_latency_s", "comm_latency_s",
                                                       "comm_bytes_per_s", "backward_compute_ratio")}
    return row


def _cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    from distnorm.testing import spawn

    rows = []
    for world in args.worlds:
        cfg = {"tokens": args.tokens, "hidden": args.hidden, "layers": args.layers, "iters": args.iters,
               "modes": args.modes, "tile": args.tile, "link_latency_s": args.link_latency_ms / 1e3,
               "link_bytes_per_s": args.link_gbps * 1e9 / 8}
        ranks = spawn(world, _cpu_rank, cfg, timeout=args.timeout)
        rows += ranks[0]  # every rank holds the same (max over ranks) numbers
        print(f"  done: world {world}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------
# GPU: one device, collectives replaced by a calibrated stand-in on a side stream
# --------------------------------------------------------------------------------------------


def _cuda_sleep_cycles_per_s() -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    tp = 8  # this GPU plays one rank of a TP-8 group
    hidden, layers = args.gpu_hidden, args.layers
    h100 = DeviceProfile()  # 8xH100 NVLink all-reduce: ~12 us + bytes / 250 GB/s
    cycles_per_s = _cuda_sleep_cycles_per_s()

    def stand_in(t: torch.Tensor) -> None:
        seconds = h100.comm_s(t.numel() * t.element_size())
        torch.cuda._sleep(max(1, int(seconds * cycles_per_s)))

    def cuda_time(fn: Callable[[], Any]) -> float:
        return _median_s(fn, iters=args.iters, warmup=3, sync=torch.cuda.synchronize)

    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(hidden, 4 * hidden // tp, group=None, generator=gen, dtype=dtype, device=device)
              for _ in range(layers)]
    return [_gpu_row(blocks, tokens, tp, h100, stand_in, cuda_time) for tokens in args.gpu_tokens]


def _gpu_row(blocks: list[ParallelMLPBlock], tokens: int, tp: int, h100: DeviceProfile,
             stand_in: Callable[[torch.Tensor], None], cuda_time: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    w = blocks[0].norm_weight
    hidden, layers, dtype = w.shape[0], len(blocks), w.dtype
    x = torch.randn(tokens, hidden, device=w.device, dtype=dtype)
    residual = torch.randn_like(x)
    row: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "tp_shard_of": tp, "layers": layers}

    def comm_alone() -> None:
        for _ in range(layers):
            stand_in(x)

    def compute_samples(n: int) -> Callable[[], Any]:
        return lambda: [b.partial(x[:n]) for b in blocks]

    with torch.no_grad():
        # compute alone (no collective), unsplit and split, and per-block samples for the model
        half = TokenSplitPlan(num_tokens=tokens, first=tokens // 2)
        local, local_split = TokenWeaver(blocks, None, None), TokenWeaver(blocks, None, half)
        row["compute_s"] = cuda_time(lambda: local(x, residual))
        row["compute_split_s"] = cuda_time(lambda: local_split(x, residual))
        samples = [(n, cuda_time(compute_samples(n)) / layers) for n in (tokens // 4, tokens // 2, tokens)]
        row["comm_s"] = layers * h100.comm_s(tokens * hidden * 2)
        row["comm_measured_s"] = cuda_time(comm_alone)
        profile = DeviceProfile.calibrate(compute=samples, comm=[(b, h100.comm_s(b)) for b in (1e6, 1e8)],
                                          flops_per_token=16 * hidden * hidden / tp)
        plan = plan_token_split(tokens, hidden, tp, device_profile=profile, num_layers=layers, dtype=dtype)
        plan = plan if plan.split else half
        unsplit = TokenWeaver(blocks, None, TokenSplitPlan.unsplit(tokens), stand_in=stand_in)
        weaved = TokenWeaver(blocks, None, plan, stand_in=stand_in)
        row["unsplit_s"] = cuda_time(lambda: unsplit(x, residual))
        row["weaved_s"] = cuda_time(lambda: weaved(x, residual))
        row["plan"] = {"first": plan.first, "second": plan.second, "reason": plan.reason,
                       "predicted_unsplit_s": plan.predicted_unsplit_s, "predicted_split_s": plan.predicted_split_s}
        row["hidden_s"] = row["unsplit_s"] - row["weaved_s"]
        row["overlap_efficiency"] = row["hidden_s"] / min(row["compute_s"], row["comm_measured_s"])
        row["split_overhead"] = row["compute_split_s"] / row["compute_s"]
        # fused add + RMSNorm bandwidth: read x, residual; write y, residual_out
        t_norm = cuda_time(lambda: add_rms_norm(x, residual, w, 1e-6))
        row["add_rms_norm_GBps"] = 4 * x.numel() * x.element_size() / t_norm / 1e9
        row["cuda_graph"] = _try_graph(weaved, x, residual, cuda_time)
    return row


def _try_graph(weaver: TokenWeaver, x: torch.Tensor, residual: torch.Tensor,
               cuda_time: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                weaver(x, residual)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            weaver(x, residual)
        return {"captured": True, "replay_s": cuda_time(graph.replay)}
    except (RuntimeError, ValueError, TypeError) as exc:  # report, do not hide: the table says why
        return {"captured": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f}"


def _print_cpu(rows: list[dict[str, Any]]) -> None:
    print("| mode | P | phase | compute ms (split) | link ms (split) | unsplit ms | woven ms | hidden ms "
          "| overlap eff. | split overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for ph in PHASES:
            q = r[ph]
            print(f"| {r['mode']} | {r['world']} | {ph} | {_ms(q['compute_s'])} ({_ms(q['compute_split_s']).strip()}) "
                  f"| {_ms(q['comm_s'])} ({_ms(q['comm_split_s']).strip()}) | {_ms(q['unsplit_s'])} "
                  f"| {_ms(q['woven_s'])} | {_ms(q['hidden_s'])} | {q['efficiency']:.0%} "
                  f"| {q['split_overhead']:+.1%} |")
    print()
    print("| mode | P | chunks | training step, planner unsplit / split ms | measured unsplit / split ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        p = r["plan"]
        print(f"| {r['mode']} | {r['world']} | {'+'.join(map(str, p['chunks']))} "
              f"| {_ms(p['predicted_unsplit_s'])} / {_ms(p['predicted_split_s'])} "
              f"| {_ms(p['measured_unsplit_s'])} / {_ms(p['measured_split_s'])} |")


def _print_gpu(rows: list[dict[str, Any]]) -> None:
    print("| tokens | compute ms | comm (stand-in) ms | unsplit ms | weaved ms (split) | overlap eff. | split overhead "
          "| add+RMSNorm GB/s | model unsplit / split ms | CUDA graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, g = r["plan"], r["cuda_graph"]
        graph = f"{_ms(g['replay_s'])} ms" if g["captured"] else "failed: " + g["error"][:60]
        print(f"| {r['tokens']} | {_ms(r['compute_s'])} | {_ms(r['comm_measured_s'])} | {_ms(r['unsplit_s'])} "
              f"| {_ms(r['weaved_s'])} ({p['first']}+{p['second']}) | {r['overlap_efficiency']:.0%} "
              f"| {r['split_overhead']:.3f} | {r['add_rms_norm_GBps']:.0f} "
              f"| {_ms(p['predicted_unsplit_s'])} / {_ms(p['predicted_split_s'])} | {graph} |")


def _plot(rows: list[dict[str, Any]], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if device == "cpu":
        labels = [f"{r['mode']}\nP={r['world']} {ph}" for r in rows for ph in PHASES]
        cols = [r[ph] for r in rows for ph in PHASES]
        series = [("compute alone", "compute_s"), ("unsplit + link", "unsplit_s"), ("woven + link", "woven_s")]
    else:
        labels, cols = [f"T={r['tokens']}" for r in rows], rows
        series = [("compute alone", "compute_s"), ("unsplit", "unsplit_s"), ("weaved", "weaved_s")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(cols), 3.4))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        ax.bar([j + i * width for j in range(len(cols))], [c[key] * 1e3 for c in cols], width, label=name)
    if device == "cuda":
        for j, r in enumerate(rows):
            ax.plot([j + 2 * width - width / 2, j + 2 * width + width / 2],
                    [r["plan"]["predicted_split_s"] * 1e3] * 2, "k--", lw=1)
    ax.set_xticks([j + width for j in range(len(cols))], labels, fontsize=7)
    ax.set_ylabel("ms" + (" (dashes: model)" if device == "cuda" else ""))
    ax.set_title(f"TokenWeaver on {device}" + (" through a modelled link" if device == "cpu" else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--modes", nargs="+", default=["allreduce", "reduce_scatter"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tile", type=int, default=16, help="the planner's token alignment (CPU)")
    ap.add_argument("--link-latency-ms", type=float, default=1.0, help="modelled link: latency per collective (CPU)")
    ap.add_argument("--link-gbps", type=float, default=2.0, help="modelled link: bus bandwidth, Gbit/s (CPU)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per world, seconds (CPU)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: P = 2, tiny shapes, one round")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--gpu-tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--gpu-hidden", type=int, default=8192)
    args = ap.parse_args()
    if args.quick:
        args.worlds, args.tokens, args.hidden, args.layers, args.iters = [2], 64, 32, 2, 1
        args.link_latency_ms, args.timeout = 0.2, 300.0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_overlap: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    t0 = time.time()
    rows = _cpu(args) if args.device == "cpu" else _gpu(args)
    (_print_cpu if args.device == "cpu" else _print_gpu)(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "argv": sys.argv, "wall_s": time.time() - t0,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    path = args.out / f"bench_overlap_{args.device}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    _plot(rows, args.device, args.out / f"bench_overlap_{args.device}.png")
    print(f"wrote {path} and .png ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
