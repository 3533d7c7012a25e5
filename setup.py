"""What setup.cfg cannot say: ship csrc/ inside the package (the kernel is compiled from it on
first CUDA use), and optionally build the extension ahead of time:

    TP_SOFTMAX_BUILD_EXT=1 pip install --no-build-isolation .
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "tp_softmax" / "csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("TP_SOFTMAX_BUILD_EXT", "") not in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(CUDAExtension(
        name="tp_softmax._C",
        sources=["csrc/torch_binding.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/kernels").glob("*.cu")),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        py_limited_api=False,
    ))
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=True)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
