"""csrc/cuda/kernel_resources.h, the registers and shared memory from which the CUDA emulation
computes occupancy, is what the CUDA build of this checkout has (scripts/kernel_resources.py)."""
import importlib.util
import os
import subprocess
import sys

import pytest

import grad_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "kernel_resources.py")
_spec = importlib.util.spec_from_file_location("kernel_resources", SCRIPT)
kernel_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_resources)


@pytest.mark.parametrize("demangled,name", [
    ("void grad_ext::cuda::forward_points_kernel<float, 2, 2>(float const*, float const*, float*, "
     "grad_ext::cuda::KernelGeometry, grad_ext::cuda::SampleParams)",
     "grad_ext::cuda::forward_points_kernel<float, 2, 2>"),
    ("void grad_ext::(anonymous namespace)::refine_forward_kernel<c10::Half>(c10::Half const*, long, "
     "at::OpMathType<c10::Half>::type*)", "grad_ext::(anonymous namespace)::refine_forward_kernel<c10::Half>"),
    ("grad_ext::(anonymous namespace)::jitter_noise_kernel(long const*, long, int, float, float, int, float*, bool*)",
     "grad_ext::(anonymous namespace)::jitter_noise_kernel"),
])
def test_kernel_names_lose_return_type_and_parameters(demangled, name):
    assert kernel_resources.kernel_name(demangled) == name


def test_resource_table_matches_the_cuda_build():
    if not grad_ext.info()["cuda"]:
        pytest.skip("grad_ext was built without its CUDA kernels (GRAD_EXT_CUDA=0)")
    try:
        kernel_resources.find_cuobjdump()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    done = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
