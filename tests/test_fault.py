"""Fault tests: a peer that dies or stops mid-training gives the survivors an error, never a hang.

Three real gloo processes train a small tensor-parallel block (sequence-parallel RMSNorm, column-
and row-parallel linears; ``init_distributed(tp=3, timeout=...)``); after a few steps rank 2 is SIGKILLed (gloo sees the connection reset at once) or
SIGSTOPped (it never arrives at the next collective: the process group's timeout fires). Either
way the two survivors must exit non-zero, with a message naming their rank, within the configured
timeout plus slack.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from distnorm.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 3
PG_TIMEOUT_S = 8
STEP_SLEEP_S = 0.02


def _train(steps: int) -> None:
    """One rank of the job (run in a subprocess with RANK/WORLD_SIZE/MASTER_* set)."""
    import distnorm as dn
    from distnorm.tensor_parallel import ColumnParallelLinear, RowParallelLinear, SequenceParallelRMSNorm

    topo = dn.init_distributed(tp=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S))
    g = torch.Generator().manual_seed(0)  # the same full weights on every rank
    up = ColumnParallelLinear(16, 32, group=topo.tp_group, sequence_parallel=True, generator=g)
    down = RowParallelLinear(32, 16, group=topo.tp_group, sequence_parallel=True, generator=g)
    norm = SequenceParallelRMSNorm(16, group=topo.tp_group)  # weight grads all-reduced in backward
    params = [*norm.parameters(), *up.parameters(), *down.parameters()]
    opt = torch.optim.SGD(params, lr=1e-2)
    data = torch.Generator().manual_seed(1 + topo.rank)
    try:
        for step in range(steps):
            x_shard = torch.randn(6, 16, generator=data)  # this rank's 6 of 18 tokens
            y_shard = x_shard + down(torch.nn.functional.gelu(up(norm(x_shard))))
            loss = y_shard.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"rank {topo.rank} step {step}", flush=True)
            time.sleep(STEP_SLEEP_S)
    except Exception as exc:
        print(f"rank {topo.rank}: training failed at a collective: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        os._exit(1)  # a dead peer can leave gloo's shutdown waiting: leave at once, non-zero
    dn.topology.destroy()


def _start(rank: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
    code = "from tests.test_fault import _train; _train(100000)"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _drain(stream, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "never_arrives"])
def test_lost_rank_gives_survivors_an_error_within_the_timeout(sig):
    port = free_port()
    procs = [_start(r, port) for r in range(WORLD)]
    out: list[list[str]] = [[] for _ in procs]
    err: list[list[str]] = [[] for _ in procs]
    readers = [_drain(p.stdout, out[r]) for r, p in enumerate(procs)]
    readers += [_drain(p.stderr, err[r]) for r, p in enumerate(procs)]
    try:
        deadline = time.monotonic() + 60  # start-up on a loaded machine
        while not any("step 3" in line for line in out[2]):
            assert time.monotonic() < deadline, f"rank 2 never reached step 3: {err}"
            assert all(p.poll() is None for p in procs), f"a rank exited early: {err}"
            time.sleep(0.05)
        procs[2].send_signal(sig)
        killed_at = time.monotonic()
        codes = [p.wait(timeout=PG_TIMEOUT_S + 20) for p in procs[:2]]
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
    for t in readers:
        t.join(5)
    print(f"survivors exited {codes} {elapsed:.1f} s after the kill:", [e[-1].strip() for e in err[:2]])
    assert codes == [1, 1], (codes, err)
    assert elapsed < PG_TIMEOUT_S + 6, elapsed  # the survivors leave within the timeout (+ slack)
    for rank in range(2):
        assert any(f"rank {rank}: training failed at a collective" in line for line in err[rank]), err[rank]


def _start_launcher(rank: int, port: int, out_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
    args = ["--steps", "100000", "--log-every", "1", "--batch-size", "6", "--corpus-bytes", "65536", "--d-model", "32",
            "--seq-len", "32", "--tp", "1", "--timeout-s", str(PG_TIMEOUT_S), "--no-progress", "--out-dir", str(out_dir)]
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_launcher_survivors_exit_within_timeout_s(tmp_path):
    """launch/train.py as torchrun starts it (RANK/WORLD_SIZE/MASTER_*), DP = 3: rank 2 stops."""
    port = free_port()
    procs = [_start_launcher(r, port, tmp_path) for r in range(WORLD)]
    out: list[list[str]] = [[] for _ in procs]
    err: list[list[str]] = [[] for _ in procs]
    readers = [_drain(p.stdout, out[r]) for r, p in enumerate(procs)] + [_drain(p.stderr, err[r]) for r, p in enumerate(procs)]
    try:
        deadline = time.monotonic() + 90
        while not any("step     3" in line for line in out[0]):  # rank 0 logs every step
            assert time.monotonic() < deadline, f"no training progress: {out[0][-3:]} {err}"
            assert all(p.poll() is None for p in procs), f"a rank exited early: {err}"
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        codes = [p.wait(timeout=PG_TIMEOUT_S + 30) for p in procs[:2]]
        elapsed = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for t in readers:
        t.join(5)
    assert codes == [1, 1], (codes, err)
    assert elapsed < PG_TIMEOUT_S + 6, elapsed
    for rank in range(2):
        assert any(line.startswith("train.py: error:") for line in err[rank]), err[rank]


def _multi_rank_calls_without_timeout(path: Path) -> list[str]:
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            world = node.args[0] if node.args else None
            never_starts = isinstance(world, ast.Constant) and not (isinstance(world.value, int) and world.value >= 1)
            if name in ("simulate", "spawn") and not never_starts and not any(k.arg == "timeout" for k in node.keywords):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return missing


def test_every_multi_rank_call_in_the_suite_passes_a_timeout():
    # No test can hang: every simulate/spawn call names its timeout (pytest's own is the backstop).
    missing = [loc for path in sorted((ROOT / "tests").rglob("*.py")) for loc in _multi_rank_calls_without_timeout(path)]
    assert not missing, f"simulate/spawn calls without timeout=: {missing}"
