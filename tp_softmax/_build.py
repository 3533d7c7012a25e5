"""Compiling and loading the CUDA extension.

The kernel is compiled on the first CUDA call (``torch.utils.cpp_extension.load``, cached
under ``TP_SOFTMAX_BUILD_DIR`` or ``~/.cache/tp_softmax``), for the architectures of
``TORCH_CUDA_ARCH_LIST`` when set, else for the GPUs present (Hopper as ``sm_90``). Under
torchrun only one process per node compiles: the others wait on a lock file; a lock left by
a build that was killed gives a clear error instead of a hang. An extension built ahead of
time (``TP_SOFTMAX_BUILD_EXT=1 pip install --no-build-isolation .``) is used when present.
"""

import errno
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load", "load_error", "source_dir", "build_dir", "LOCK_TIMEOUT_ENV"]

LOCK_TIMEOUT_ENV = "TP_SOFTMAX_BUILD_TIMEOUT"
_NAME = "tp_softmax_cuda"
_state = {"loaded": False, "error": None}


def source_dir() -> Optional[Path]:
    """The ``csrc`` folder: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "torch_binding.cpp").is_file():
            return cand
    return None


def _sources(src: Path) -> List[Path]:
    return [src / "torch_binding.cpp"] + sorted((src / "kernels").glob("*.cu"))


def _arch_tag() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def build_dir(src: Path) -> Path:
    digest = hashlib.sha256()
    for f in sorted(_sources(src) + list((src / "kernels").glob("*.h")) + list((src / "kernels").glob("*.cuh"))):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{_arch_tag()}".encode())
    root = Path(os.environ.get("TP_SOFTMAX_BUILD_DIR", Path.home() / ".cache" / "tp_softmax"))
    return root / digest.hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class _NodeLock:
    """An exclusive lock file: one process per node builds, the others wait."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout, self.owned = path, timeout, False

    def __enter__(self):
        deadline = time.monotonic() + self.timeout
        me = f"{socket.gethostname()} {os.getpid()}\n"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._check_stale()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tp_softmax: timed out after {self.timeout:.0f} s waiting for another process to "
                        f"build the CUDA kernel (lock {self.path}); set {LOCK_TIMEOUT_ENV} to wait longer"
                    ) from None
                time.sleep(0.5)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.owned = True
            return self

    def _check_stale(self):
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return  # being written right now
        if host == socket.gethostname() and not _pid_alive(int(pid)):
            raise RuntimeError(
                f"tp_softmax: stale build lock {self.path}: the process that held it (pid {pid}) is gone, "
                f"so its build was interrupted. Remove the lock file (and the folder {self.path.parent} "
                f"if the build keeps failing) and run again."
            )

    def __exit__(self, *exc):
        if self.owned:
            self.path.unlink(missing_ok=True)


def _load_prebuilt() -> bool:
    here = Path(__file__).resolve().parent
    for lib in sorted(here.glob("_C*.so")):
        torch.ops.load_library(str(lib))
        return True
    return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise RuntimeError("tp_softmax: the CUDA sources (csrc/) are not installed with the package")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("tp_softmax: no CUDA toolkit found (CUDA_HOME / nvcc) to build the kernel")
    out = build_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "1800"))
    with _NodeLock(out / "tp_softmax.lock", timeout):
        torch_lock = out / "lock"
        if torch_lock.exists():
            raise RuntimeError(
                f"tp_softmax: stale build lock {torch_lock} left by an interrupted build; remove it and run again"
            )
        arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch_env:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_tag()
        try:
            cpp_extension.load(
                name=_NAME,
                sources=[str(s) for s in _sources(src)],
                extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"],
                extra_include_paths=[str(src)],
                build_directory=str(out),
                is_python_module=False,
                verbose=os.environ.get("TP_SOFTMAX_VERBOSE_BUILD", "") not in ("", "0"),
            )
        finally:
            if not arch_env:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def load() -> bool:
    """Load the CUDA op (building it if needed) once; False with :func:`load_error` on failure."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    try:
        if not _load_prebuilt():
            _jit_build()
        torch.ops.tp_softmax.attention_softmax  # noqa: B018 - raises if the op is missing
        _state["loaded"] = True
    except Exception as e:  # reported by unsupported_reasons and `python -m tp_softmax`
        _state["error"] = f"{type(e).__name__}: {e}"
    return _state["loaded"]


def load_error() -> Optional[str]:
    return _state["error"]
