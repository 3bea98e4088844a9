"""Norm kernels at the memory-bandwidth limit: distnorm vs torch eager, torch.compile and Liger.

For each op (RMSNorm, LayerNorm, fused residual-add + RMSNorm), shape [tokens, hidden], dtype and
mode (``fwd``, ``fwd_bwd``) this times every provider and reports the time, the achieved bandwidth
over the *minimum* bytes and that bandwidth as a % of the device's copy bandwidth, measured in the
same run by timing ``clone`` of the op's input (read + write of the same bytes).

Minimum bytes (B = bytes of one [T, H] activation, w = bytes of one [H] vector)::

    fwd      read x (+ residual) + w (+ b); write y (+ residual_out)
    fwd_bwd  fwd + read x, dy (+ dresidual_out), w; write dx, dw (+ db)

Providers: ``distnorm`` (Triton kernels through distnorm.kernels' autograd functions),
``eager`` (the usual hand-written torch function: HF LlamaRMSNorm / F.layer_norm),
``F`` (torch.nn.functional's native rms_norm / layer_norm), ``compile`` (torch.compile of the eager
function), ``liger`` (Liger-Kernel, when importable). On a CPU (``--device cpu``) only the torch
providers run (``--quick``: eager and F); that mode exists so the script itself is tested.

    python benchmarks/bench_norm_kernels.py                      # GPU, bf16, the 4 issue shapes
    python benchmarks/bench_norm_kernels.py --dtypes bf16,fp16,fp32 --ops rms_norm,layer_norm,add_rms_norm
    python benchmarks/bench_norm_kernels.py --device cpu --quick # smoke run

Writes ``<out>/bench_norm_kernels.{json,md,png}`` (default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ISSUE_SHAPES = [(4096, 4096), (16384, 4096), (8192, 8192), (32768, 8192)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# the eager functions (what a model would write by hand)


def rms_norm_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """HF ``LlamaRMSNorm.forward``: float32 statistics, weight applied in the input dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    return w * y.to(x.dtype)


def layer_norm_eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def add_rms_norm_eager(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + r
    return rms_norm_eager(s, w), s


# ----------------------------------------------------------------------------------------------
# providers: setup_fn(op, x, r, w, b) -> forward callable returning a tensor or a tuple of tensors


def _liger(op: str) -> Callable | None:
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, r, w, b: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, r, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        return lambda x, r, w, b: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)
    except ImportError:
        return None


def _provider(name: str, op: str, device: str) -> Callable | None:
    """The forward callable ``f(x, r, w, b)`` of provider ``name`` for ``op`` (None = unavailable)."""
    if name == "distnorm":
        if device != "cuda":
            return None
        from distnorm import kernels as K

        return {
            "rms_norm": lambda x, r, w, b: K.rms_norm(x, w, EPS, backend="triton"),
            "layer_norm": lambda x, r, w, b: K.layer_norm(x, w, b, EPS, backend="triton"),
            "add_rms_norm": lambda x, r, w, b: K.add_rms_norm(x, r, w, EPS, backend="triton"),
        }[op]
    eager = {
        "rms_norm": lambda x, r, w, b: rms_norm_eager(x, w),
        "layer_norm": lambda x, r, w, b: layer_norm_eager(x, w, b),
        "add_rms_norm": lambda x, r, w, b: add_rms_norm_eager(x, r, w),
    }[op]
    if name == "eager":
        return eager
    if name == "F":
        return {
            "rms_norm": lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS),
            "layer_norm": lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
            "add_rms_norm": None,  # no native fused op in torch
        }[op]
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    if name == "liger":
        return _liger(op) if device == "cuda" else None
    raise ValueError(f"unknown provider {name!r}")


# ----------------------------------------------------------------------------------------------
# timing


def _time_ms(fn: Callable[[], object], device: str, quick: bool) -> float:
    """Median milliseconds of ``fn`` (CUDA: triton's do_bench, which flushes L2 between runs)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 200, return_mode="median"))
    fn()
    times = []
    for _ in range(3 if quick else 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def min_bytes(op: str, mode: str, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    """The bytes an ideal kernel must move (see the module docstring)."""
    act = tokens * hidden * torch.finfo(dtype).bits // 8
    vec = hidden * torch.finfo(dtype).bits // 8
    n_vec = 2 if op == "layer_norm" else 1
    if op == "add_rms_norm":
        fwd = 4 * act + vec  # read x, residual; write y, residual_out
        bwd = 3 * act + 2 * vec  # read residual_out, dy, dresidual_out; write dx; read w, write dw
    else:
        fwd = 2 * act + n_vec * vec  # read x; write y
        bwd = 3 * act + (1 + n_vec) * vec  # read x, dy; write dx; read w; write dw (+ db)
    return fwd if mode == "fwd" else fwd + bwd


def _run_case(op, mode, provider, fwd, tokens, hidden, dtype, device, quick):
    g = torch.Generator(device=device).manual_seed(0)
    need_grad = mode == "fwd_bwd"
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_(need_grad)
    r = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_(need_grad)
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype, generator=g)).requires_grad_(need_grad)
    b = (0.1 * torch.randn(hidden, device=device, dtype=dtype, generator=g)).requires_grad_(need_grad)
    inputs = [x, w] + ([b] if op == "layer_norm" else []) + ([r] if op == "add_rms_norm" else [])
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd(x, r, w, b)
    else:
        out = fwd(x, r, w, b)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads_out = [torch.randn_like(o) for o in outs]

        def step():
            o = fwd(x, r, w, b)
            return torch.autograd.grad(list(o) if isinstance(o, tuple) else [o], inputs, grads_out)
    return _time_ms(step, device, quick)


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    shapes = [(64, 256)] if args.quick and device == "cpu" else ([(4096, 4096)] if args.quick else ISSUE_SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for tokens, hidden in shapes:
            # copy bandwidth of this device, measured now: clone reads and writes one activation
            src = torch.randn(tokens, hidden, device=device, dtype=dtype)
            clone_ms = _time_ms(lambda src=src: src.clone(), device, args.quick)
            copy_gbps = 2 * src.numel() * src.element_size() / clone_ms / 1e6
            del src
            for op in args.ops.split(","):
                for mode in args.modes.split(","):
                    nbytes = min_bytes(op, mode, tokens, hidden, dtype)
                    for provider in args.providers.split(","):
                        row = {"op": op, "mode": mode, "dtype": dtype_name, "tokens": tokens, "hidden": hidden,
                               "provider": provider, "min_bytes": nbytes, "copy_gbps": copy_gbps}
                        try:
                            fwd = _provider(provider, op, device)
                            if fwd is None:
                                continue
                            ms = _run_case(op, mode, provider, fwd, tokens, hidden, dtype, device, args.quick)
                            gbps = nbytes / ms / 1e6
                            row.update(ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps)
                        except Exception as exc:  # noqa: BLE001  (one failing provider must not end the run)
                            row.update(ms=None, error=f"{type(exc).__name__}: {exc}"[:200])
                        rows.append(row)
                        _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    head = f"{row['op']:>12} {row['mode']:>7} {row['dtype']:>4} {row['tokens']:>6}x{row['hidden']:<5} {row['provider']:>9}"
    if row.get("ms") is None:
        print(f"{head}  n/a ({row.get('error', '')})", flush=True)
    else:
        print(f"{head} {row['ms']:9.4f} ms {row['gbps']:8.1f} GB/s {row['pct_copy']:6.1f} % of copy", flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device_name']}; date {meta['date']}; torch {meta['torch']}; triton {meta['triton']}",
             f"Command: `{meta['command']}`", "",
             "| op | mode | dtype | shape | provider | ms | GB/s | % of copy |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['tokens']}x{r['hidden']}"
        if r.get("ms") is None:
            lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r['provider']} | n/a | | |")
        else:
            lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r['provider']} | {r['ms']:.4f} | "
                         f"{r['gbps']:.0f} | {r['pct_copy']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars per shape: % of copy bandwidth, one subplot per (op, mode, dtype), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ms") is not None]
    panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in ok})
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3 * len(panels)), squeeze=False)
    for ax, (op, mode, dtype) in zip(axes[:, 0], panels):
        sel = [r for r in ok if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        shapes = sorted({(r["tokens"], r["hidden"]) for r in sel})
        providers = sorted({r["provider"] for r in sel})
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = [next((r["pct_copy"] for r in sel if r["provider"] == p and (r["tokens"], r["hidden"]) == s), 0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"{t}x{h}" for t, h in shapes])
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"{op} {mode} {dtype}")
        ax.axhline(100, color="grey", lw=0.5)
        ax.legend(fontsize=7, ncol=len(providers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--ops", default="rms_norm,layer_norm", help="comma list of rms_norm, layer_norm, add_rms_norm")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--providers", default=None,
                        help="comma list of distnorm, eager, F, compile, liger (default: all; "
                             "--device cpu --quick: eager,F, as compiling takes a minute there)")
    parser.add_argument("--shapes", default="", help="comma list of TOKENSxHIDDEN (default: the issue's four)")
    parser.add_argument("--quick", action="store_true", help="one shape, few repetitions")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = "eager,F" if args.quick and args.device == "cpu" else "distnorm,eager,F,compile,liger"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick for a smoke run)")
    import triton

    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(["python", "benchmarks/bench_norm_kernels.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_norm_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench_norm_kernels.md").write_text(markdown(rows, meta))
    plot(rows, out / "bench_norm_kernels.png")
    print(f"wrote {out / 'bench_norm_kernels'}.{{json,md,png}}")


if __name__ == "__main__":
    main()
