"""The build machinery that runs without a GPU: the node lock and the environment report."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tp_softmax import _build


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_from_a_killed_build_is_an_error_not_a_hang(tmp_path):
    lock = tmp_path / "tp_softmax.lock"
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stale build lock"):
        with _build._NodeLock(lock, timeout=30):
            pass
    assert time.monotonic() - start < 10
    assert lock.exists(), "the error must leave the lock for the user to inspect"


def test_live_lock_holder_makes_others_wait_then_time_out(tmp_path):
    lock = tmp_path / "tp_softmax.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    with pytest.raises(RuntimeError, match="timed out .* waiting for another process"):
        with _build._NodeLock(lock, timeout=1):
            pass


def test_lock_is_taken_and_released(tmp_path):
    lock = tmp_path / "tp_softmax.lock"
    with _build._NodeLock(lock, timeout=5):
        assert lock.read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not lock.exists()


def test_waiter_proceeds_once_the_builder_releases(tmp_path):
    lock = tmp_path / "tp_softmax.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from tp_softmax import _build;\n"
        "l = _build._NodeLock(__import__('pathlib').Path(sys.argv[2]), 30)\n"
        "l.__enter__(); print('locked', flush=True); time.sleep(1.5); l.__exit__(None, None, None)"),
        os.path.dirname(os.path.dirname(os.path.abspath(_build.__file__))), str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with _build._NodeLock(lock, timeout=30):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited >= 0.5


def test_sources_ship_with_the_package():
    src = _build.source_dir()
    assert src is not None and (src / "torch_binding.cpp").is_file()
    assert sorted(p.name for p in (src / "kernels").glob("*.cu"))


def test_environment_report_names_every_reason_on_a_machine_without_cuda():
    env = dict(os.environ, TP_SOFTMAX_FORCE_TORCH="1")
    out = subprocess.run([sys.executable, "-m", "tp_softmax"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "torch " in text and "nvcc" in text
    for dtype in ("float16", "bfloat16", "float32"):
        assert f"{dtype}" in text
    assert "TP_SOFTMAX_FORCE_TORCH is set" in text
    import torch

    if not torch.cuda.is_available():
        assert "CUDA: not available" in text
