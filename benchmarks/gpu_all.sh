#!/usr/bin/env bash
# Everything distnorm measures on a GPU, in one call (issue 14): install what is missing, run the
# GPU tests and every GPU benchmark, and leave the tables, JSON and PNGs under $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_all.sh                 # on any CUDA machine, from anywhere
#   device tool:  run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=560)
#
# Budget: about 8 minutes on one H200, every step under its own `timeout` so that one slow or
# hanging step cannot take the rest down; a failed step is logged and the script goes on. The
# device tool brings back at most 8 files from $OUT, so everything is also packed into
# $OUT/gpu_results.tgz; $OUT/gpu_all.log has each step's command, exit code and last lines.
#
# Installs only what is missing: torch (a CUDA build for the driver's CUDA version), triton,
# liger-kernel (the benchmarks' best peer) and pytest-timeout. A machine without network (the
# device tool's) takes Liger from wheels carried in .whl/ (see /work/.library/device/README.md:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl liger-kernel==X`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d)
BENCH=$WORK/bench
mkdir -p "$BENCH"
LOG=$OUT/gpu_all.log
: > "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

note() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD under a time limit, keep its whole output in the tarball and
# its tail in the log
step() {
  local name=$1 limit=$2
  shift 2
  note "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  tail -n 30 "$WORK/$name.txt" >> "$LOG"
  note "== $name: exit $rc"
}

# ---- 1. install what is missing --------------------------------------------------------------
if ! nvidia-smi > /dev/null 2>&1; then
  note "no NVIDIA GPU here (nvidia-smi fails): nothing to measure, nothing installed"
  exit 1
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -n 1)
  note "installing torch for CUDA ${cuda:-unknown}"
  $PY -m pip install -q torch --index-url "https://download.pytorch.org/whl/cu${cuda:-126}" >> "$LOG" 2>&1 \
    || { note "no CUDA torch: nothing to measure"; exit 1; }
fi
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q triton >> "$LOG" 2>&1
$PY -c "import pytest_timeout" 2>/dev/null || $PY -m pip install -q pytest pytest-timeout >> "$LOG" 2>&1
if ! $PY -c "import liger_kernel" 2>/dev/null; then
  if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-deps --no-index --target /tmp/liger_site .whl/*.whl >> "$LOG" 2>&1 \
      && export PYTHONPATH=$PYTHONPATH:/tmp/liger_site
  else
    $PY -m pip install -q --no-deps liger-kernel >> "$LOG" 2>&1 || note "liger-kernel unavailable: its column stays empty"
  fi
fi
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -n 1
  git rev-parse HEAD 2>/dev/null
} > "$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt" >> "$LOG"

# ---- 2. the GPU tests ------------------------------------------------------------------------
step gpu_tests 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_gpu.py tests/overlap/test_cuda.py

# ---- 3. the benchmarks -----------------------------------------------------------------------
# kernels vs eager, torch.compile and Liger at the issue's shapes; copy bandwidth measured in-run
step kernels 170 $PY benchmarks/bench_norm_kernels.py --dtypes bf16 --ops rms_norm,layer_norm,add_rms_norm --out "$BENCH"
# distnorm's modules vs torch's own, fwd+bwd, world 1
step local 100 $PY benchmarks/bench_local.py --device cuda --dtypes bf16,fp32 --min-time 0.2 --out "$BENCH"
step sync_batch_norm 50 $PY benchmarks/bench_sync_batch_norm.py --device cuda --out "$BENCH"
# the woven overlap path at world 1 (stand-in collectives), add+RMSNorm bandwidth, CUDA-graph capture
step overlap 60 $PY benchmarks/bench_overlap.py --device cuda --out "$BENCH"
# fused_allreduce_rms_norm at world 1, captured in a CUDA graph and replayed
step fused_graph 30 $PY - <<'EOF'
import torch
import distnorm as dn

torch.manual_seed(0)
t, h = 8192, 8192
partial = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
residual = torch.randn_like(partial)
weight = torch.rand(h, device="cuda", dtype=torch.bfloat16) + 0.5
eager = dn.fused_allreduce_rms_norm(partial, residual, weight, 1e-6, group=None)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3):
        dn.fused_allreduce_rms_norm(partial, residual, weight, 1e-6, group=None)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = dn.fused_allreduce_rms_norm(partial, residual, weight, 1e-6, group=None)
graph.replay()
torch.cuda.synchronize()
same = all(torch.equal(a, b) for a, b in zip(eager, captured))
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(50):
    graph.replay()
end.record()
torch.cuda.synchronize()
ms = start.elapsed_time(end) / 50
gbps = 4 * partial.numel() * partial.element_size() / (ms * 1e-3) / 1e9  # read partial, residual; write y, residual_out
print(f"fused_allreduce_rms_norm world 1 [{t}x{h}] bf16: captured in a CUDA graph, replay equal to eager: {same}, "
      f"{ms:.3f} ms per replay, {gbps:.0f} GB/s")
EOF
# registers and spills per kernel variant for this GPU
cc=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(p[0] * 10 + p[1])" 2>/dev/null || echo 90)
step kernel_resources 60 $PY benchmarks/kernel_resources.py --arch "$cc"

# ---- 4. collect ------------------------------------------------------------------------------
cp "$WORK"/*.txt "$BENCH"/ 2> /dev/null
tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
for f in "$BENCH"/bench_norm_kernels.md "$BENCH"/bench_local.json "$BENCH"/bench_sync_batch_norm_cuda.json \
         "$BENCH"/bench_overlap_cuda.json "$WORK"/fused_graph.txt; do
  [ -f "$f" ] && cp "$f" "$OUT"/
done
note "done: $(ls "$OUT" | tr '\n' ' ')"
