"""The sharding check of launch/verify_sharding.py under torchrun, on CPU with gloo.

Each test starts ``python -m torch.distributed.run --standalone`` once for a whole grid of
cases; the launcher makes every rank check its shard and reduces the verdict, and its exit
status and summary line decide here. The fault-injection tests show that it can fail.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "verify_sharding.py"
TIMEOUT_S = 240


def run_launcher(world: int, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TP_SOFTMAX_FORCE_TORCH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(LAUNCHER), "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"


def _rows(proc):
    return [line for line in proc.stdout.splitlines() if line.rstrip().endswith(("pass", "FAIL"))]


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_case_passes(world):
    proc = run_launcher(world)
    assert proc.returncode == 0, _output(proc)
    rows = _rows(proc)
    assert len(rows) == 45, _output(proc)
    assert all(row.split()[-2:] == ["yes", "pass"] for row in rows), _output(proc)
    assert f"SUMMARY: all {len(rows)} cases passed (world size {world}, gloo)" in proc.stdout, _output(proc)
    heads = {int(re.search(r"-h(\d+)-", row).group(1)) for row in rows}
    if world > 1:
        assert any(h % world for h in heads) and any(h % world == 0 for h in heads), heads


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_case_filter_and_seed():
    proc = run_launcher(2, "--cases", "decode,window-only", "--seed", "7")
    assert proc.returncode == 0, _output(proc)
    rows = _rows(proc)
    assert rows and all(("decode" in r or "window-only" in r) for r in rows), _output(proc)
    assert "seed 7" in proc.stdout


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_no_matching_case_is_an_error():
    proc = run_launcher(1, "--cases", "no-such-case")
    assert proc.returncode != 0
    assert "no case matches" in proc.stderr, _output(proc)


# --inject-fault: the launcher's self-test. The last rank misbehaves; the check must say so.


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_wrong_head_offset_on_one_rank_fails():
    proc = run_launcher(3, "--quick", "--inject-fault", "head-offset")
    assert proc.returncode == 1, _output(proc)
    rows = _rows(proc)
    per_head = [r for r in rows if any(w in r for w in ("alibi", "slopes", "head-"))]
    assert per_head and all(r.endswith("FAIL") for r in per_head), _output(proc)
    assert all(r.endswith("pass") for r in rows if r not in per_head), _output(proc)
    assert "ranks whose own shard differs: [2]" in proc.stdout, _output(proc)
    assert "cases FAILED" in proc.stdout


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_one_flipped_bit_fails():
    proc = run_launcher(2, "--quick", "--cases", "fp32", "--inject-fault", "bits")
    assert proc.returncode == 1, _output(proc)
    rows = _rows(proc)
    assert rows and all(r.split()[-2:] == ["no", "FAIL"] for r in rows), _output(proc)
    assert all(float(r.split()[-3]) < 1e-3 for r in rows), "a one-bit difference must still fail"


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_a_rank_that_raises_fails_with_its_message():
    proc = run_launcher(2, "--quick", "--inject-fault", "raise")
    assert proc.returncode == 1, _output(proc)
    assert "rank 1: RuntimeError: fault injected by --inject-fault raise" in proc.stdout, _output(proc)


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("fault,words", [("options", ["disagree on options", "'seed': 0", "'seed': 1"]),
                                         ("shapes", ["disagree on case", "'k': 64", "'k': 65"])])
def test_ranks_that_disagree_get_an_error_not_a_hang(fault, words):
    proc = run_launcher(2, "--quick", "--inject-fault", fault)
    assert proc.returncode != 0, _output(proc)
    for word in words:
        assert word in proc.stderr, _output(proc)
    assert "SUMMARY" not in proc.stdout


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_a_stalled_rank_times_out():
    proc = run_launcher(2, "--quick", "--cases", "decode", "--timeout", "5", "--inject-fault", "stall",
                        timeout=120)
    assert proc.returncode != 0, _output(proc)
    assert "Timed out" in proc.stderr or "timeout" in proc.stderr.lower(), _output(proc)
