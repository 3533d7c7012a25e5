"""``python -m tp_softmax``: what this machine will run, and why."""

import os
import shutil
import subprocess

import torch

from . import __version__
from .ops import FORCE_TORCH_ENV


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed ({e})"
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else out.strip()


def main() -> int:
    print(f"tp_softmax {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc: {_nvcc_version()}")
    force = os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (compute capability {cap[0]}.{cap[1]})")
    else:
        print("CUDA: not available")
    reasons = []
    if force:
        reasons.append(f"{FORCE_TORCH_ENV} is set")
    if cuda:
        from . import _build, _kernel

        reasons += _kernel.environment_reasons()
        if _build.source_dir() is not None:
            print(f"kernel sources: {_build.source_dir()}  build cache: {_build.build_dir(_build.source_dir())}")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        print(f"  {name:9s} CPU tensors: PyTorch path")
        if cuda:
            path = "PyTorch path (fallback)" if reasons else "fused CUDA kernel"
            print(f"  {name:9s} CUDA tensors: {path}")
    if cuda and not reasons:
        from . import _kernel

        for k in (1024, 65536, 262144, 1 << 20):
            print(f"  rows of K = {k} (float16): {_kernel.row_config(k, torch.float16)}")
    if reasons:
        print("the CUDA kernel will not be used because:")
        for r in reasons:
            print(f"  - {r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
