"""grad_ext: fused C++/CUDA kernels for GRAD anomaly detection.

- :func:`grid_sample` / :class:`GridSample`: drop-in for ``F.grid_sample`` on 1-D to 4-D
  tables, with batch-shared tables and in-kernel coordinate jitter (:func:`jitter_noise`).
- :func:`refine`: GRAD's MSE/cosine feature refinement with its loss and anomaly map.
- :mod:`grad_ext.reference`: pure-torch versions of every op, for tests and benchmarks.
"""
import sys

import torch

from . import reference
from ._common import JitterNoise, RefineOutput, draw_jitter_seed
from ._ops import ops
from .refine import refine
from .sampling import GridSample, grid_sample, jitter_noise

__version__ = "0.1.0"
# The implementations of the ops by name, for callers that pick one by a setting: these
# kernels, or their pure-torch twins with the same signatures (grad_ext.reference).
IMPLEMENTATIONS = ("ext", "reference")


def implementation(name: str):
    """The module whose ``grid_sample`` / ``refine`` / ``jitter_noise`` a caller uses: grad_ext
    itself for 'ext', :mod:`grad_ext.reference` for 'reference'."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {name!r}")
    return reference if name == "reference" else sys.modules[__name__]


def info() -> dict:
    """Which backends were compiled in, and the versions they were built for.

    ``cpu_simd`` is the instruction set the CPU kernels' vector loops run with: ``'avx2'``
    (AVX2 + FMA, picked at run time when the CPU has it) or ``'baseline'`` (forced with the
    environment variable ``GRAD_EXT_CPU_SIMD=baseline``).

    Returns:
        dict with keys version, torch, cpu, cpu_simd, cuda (CUDA kernels compiled in),
        torch_cuda and cuda_available.
    """
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu": True,
        "cpu_simd": ops.cpu_simd(),
        "cuda": bool(ops.compiled_with_cuda()),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["GridSample", "IMPLEMENTATIONS", "JitterNoise", "RefineOutput", "draw_jitter_seed", "grid_sample",
           "implementation", "info", "jitter_noise", "refine"]
