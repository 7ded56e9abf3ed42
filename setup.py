"""Builds grad_ext._C: the CPU kernels always, the CUDA kernels when asked for or available.

GRAD_EXT_CUDA=1 requires a CUDA build (an error if torch has no CUDA or nvcc is missing),
GRAD_EXT_CUDA=0 builds the CPU kernels only, unset builds CUDA when both are present.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (torch's default otherwise).
"""
import glob
import os

from setuptools import setup

# Prefer the standard toolkit folder over an `nvcc` wrapper found on PATH, whose parent folder
# may hold no CUDA libraries to link against.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_STANDARD = 20


def want_cuda() -> bool:
    """Whether to build the CUDA kernels, from GRAD_EXT_CUDA and what torch and the toolkit offer."""
    flag = os.environ.get("GRAD_EXT_CUDA", "").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if torch.version.cuda is None:
            raise RuntimeError("GRAD_EXT_CUDA=1 but the installed torch has no CUDA support")
        if CUDA_HOME is None:
            raise RuntimeError("GRAD_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    if flag:
        raise RuntimeError(f"GRAD_EXT_CUDA must be 0 or 1, got {flag!r}")
    return available


def nvidia_wheel_includes():
    """Header folders of the nvidia-* pip packages that torch's CUDA wheels depend on (cuSPARSE,
    cuBLAS, ...), searched after the toolkit's own headers (-isystem comes after -I)."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "include"))})
    return [flag for d in found for flag in ("-isystem", d)]


def extension():
    """grad_ext._C: the CPU sources always, the CUDA sources too when :func:`want_cuda`."""
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # the same standard as CMakeLists.txt (CMAKE_CXX_STANDARD); torch adds none of its own then
    cxx = ["-O3", "-fopenmp", f"-std=c++{CXX_STANDARD}"]
    if want_cuda():
        nvcc = ["-O3", "-lineinfo", f"-std=c++{CXX_STANDARD}"] + nvidia_wheel_includes()
        cxx = cxx + nvidia_wheel_includes()
        return CUDAExtension(
            "grad_ext._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("GRAD_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "grad_ext._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


# Metadata, dependencies and packages are in pyproject.toml; this file adds the extension.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
