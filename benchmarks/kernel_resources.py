"""Compile every distnorm norm-kernel variant ahead of time for a GPU target; print registers/spills.

Needs no GPU: Triton compiles to PTX and ptxas (bundled with the triton wheel) to a cubin, whose
resource usage ``cuobjdump -res-usage`` reports. A kernel that spills (STACK/LOCAL > 0) or needs
more than 65536 / (32 * num_warps) registers per thread cannot keep the row in registers, which is
the first thing to check when a bandwidth target is missed.

    python benchmarks/kernel_resources.py                 # sm_90 (H100), hidden 4096 and 8192, bf16/fp32
    python benchmarks/kernel_resources.py --arch 80 --hidden 2048,4096 --dtypes bf16
    python benchmarks/kernel_resources.py --quick         # two variants: the compile smoke test

Must run with ``TRITON_INTERPRET`` unset or 0 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fwd_variant(name, dtype, hidden, *, rms, residual, weight, bias, stats_given):
    from distnorm.kernels.norm import _norm_fwd_kernel, _tile

    bm, bn, warps = _tile(hidden, dtype, "kernel_resources")
    t = _TT[dtype]
    ptr = lambda on, ty=t: f"*{ty}" if on else "constexpr"  # noqa: E731
    sig = {"X": f"*{t}", "RESIDUAL": ptr(residual), "RESIDUAL_OUT": ptr(residual), "W": ptr(weight), "B": ptr(bias),
           "Y": f"*{t}", "MEAN": ptr(not rms, "fp32"), "RSTD": "*fp32",
           "stride_x_row": "i32", "stride_res_row": "i32", "stride_res_out_row": "i32", "stride_y_row": "i32",
           "M": "i32", "N": "i32", "eps": "fp32", "output_scale": "fp32"}
    const = {k: None for k, v in sig.items() if v == "constexpr"}
    const.update(IS_RMS_NORM=rms, HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias, ZERO_CENTERED_GAMMA=False,
                 STATS_GIVEN=stats_given, BLOCK_M=bm, BLOCK_N=bn)
    return name, _norm_fwd_kernel, sig, const, warps, (bm, bn)


def _bwd_variant(name, dtype, hidden, *, rms, dresidual, compute_db, store_dx=True, store_sums=False, sums_given=False):
    import triton.language as tl

    from distnorm.kernels.norm import _norm_bwd_kernel, _tile

    bm, bn, warps = _tile(hidden, dtype, "kernel_resources", bwd=True)
    t = _TT[dtype]
    acc = "fp64" if dtype == torch.float32 else "fp32"
    ptr = lambda on, ty=t: f"*{ty}" if on else "constexpr"  # noqa: E731
    sig = {"X": f"*{t}", "W": f"*{t}", "DY": f"*{t}", "DX": ptr(store_dx), "DRESIDUAL": ptr(dresidual),
           "DW_PARTIAL": f"*{acc}", "DB_PARTIAL": ptr(compute_db, acc), "MEAN": ptr(not rms, "fp32"), "RSTD": "*fp32",
           "SUMS": ptr(store_sums or sums_given, "fp32"),
           "stride_x_row": "i32", "stride_dy_row": "i32", "stride_dx_row": "i32", "stride_dres_row": "i32",
           "M": "i32", "N": "i32", "n_total": "fp32", "output_scale": "fp32", "rows_per_program": "i32"}
    const = {k: None for k, v in sig.items() if v == "constexpr"}
    const.update(IS_RMS_NORM=rms, HAS_WEIGHT=True, ZERO_CENTERED_GAMMA=False, HAS_DRESIDUAL=dresidual,
                 COMPUTE_DW=not sums_given, COMPUTE_DB=compute_db, STORE_DX=store_dx, STORE_SUMS=store_sums,
                 SUMS_GIVEN=sums_given, ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, BLOCK_M=bm, BLOCK_N=bn)
    if sums_given:
        sig["DW_PARTIAL"] = "constexpr"
        const["DW_PARTIAL"] = None
    return name, _norm_bwd_kernel, sig, const, warps, (bm, bn)


def variants(dtype, hidden, quick):
    out = [_fwd_variant("rms fwd", dtype, hidden, rms=True, residual=False, weight=True, bias=False, stats_given=False),
           _bwd_variant("rms bwd", dtype, hidden, rms=True, dresidual=False, compute_db=False)]
    if quick:
        return out
    return [*out, _fwd_variant("ln fwd", dtype, hidden, rms=False, residual=False, weight=True, bias=True, stats_given=False), _bwd_variant("ln bwd", dtype, hidden, rms=False, dresidual=False, compute_db=True), _fwd_variant("add+rms fwd", dtype, hidden, rms=True, residual=True, weight=True, bias=False, stats_given=False), _bwd_variant("add+rms bwd", dtype, hidden, rms=True, dresidual=True, compute_db=False), _fwd_variant("ln fwd (stats given)", dtype, hidden, rms=False, residual=False, weight=True, bias=True, stats_given=True), _bwd_variant("ln bwd partial", dtype, hidden, rms=False, dresidual=False, compute_db=True, store_dx=False, store_sums=True), _bwd_variant("ln bwd finish", dtype, hidden, rms=False, dresidual=False, compute_db=False, sums_given=True)]


def compile_and_measure(kernel, sig, const, warps, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for k in const:
        sig.setdefault(k, "constexpr")
    order = list(kernel.arg_names)
    sig = {k: sig[k] for k in order}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in usage.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--hidden", default="4096,8192")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET (the interpreter replaces the kernels)")
    print(f"{'variant':>22} {'dtype':>5} {'hidden':>6} {'tile':>8} {'warps':>5} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'s':>5}")
    ok = True
    hidden_list = [int(h) for h in args.hidden.split(",")]
    for dname in args.dtypes.split(","):
        dtype = _DTYPES[dname]
        for hidden in hidden_list[:1] if args.quick else hidden_list:
            for name, kernel, sig, const, warps, (bm, bn) in variants(dtype, hidden, args.quick):
                t0 = time.time()
                u = compile_and_measure(kernel, sig, const, warps, args.arch)
                spills = u.get("STACK", 0) + u.get("LOCAL", 0)
                ok &= spills == 0
                print(f"{name:>22} {dname:>5} {hidden:>6} {bm:>3}x{bn:<4} {warps:>5} {u.get('REG', 0):>4} "
                      f"{u.get('STACK', 0):>5} {u.get('LOCAL', 0):>5} {time.time() - t0:5.1f}", flush=True)
    print("no spills" if ok else "SPILLS: see STACK/LOCAL")


if __name__ == "__main__":
    sys.exit(main())
