"""The CUDA emulation's op library for the tests: libgrad_ext_emulated.so, which
scripts/cuda_emulation.sh builds and names in GRAD_EXT_EMULATION_LIBRARY (with a sanitizer
runtime preloaded into the interpreter). Its ops are grad_ext's, under the namespace
grad_ext_emulated, taking CPU tensors and running csrc/cuda's launchers and kernels on the CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import re

import torch

from grad_ext._common import INTERPOLATIONS, JITTER_MODES, PADDINGS

LIBRARY = os.environ.get("GRAD_EXT_EMULATION_LIBRARY", "")
DEFAULTS = dict(device="h100", workers=2, order="ascending", seed=0, execute=True)
_ops = None


def ops():
    """torch.ops.grad_ext_emulated, the library loaded on first use."""
    global _ops
    if _ops is None:
        if not LIBRARY:
            raise RuntimeError("GRAD_EXT_EMULATION_LIBRARY is not set: run bash scripts/cuda_emulation.sh")
        torch.ops.load_library(LIBRARY)
        _ops = torch.ops.grad_ext_emulated
    return _ops


def configure(**settings):
    """Sets the emulation's device table, workers, block and thread order, seed and execute flag
    (each defaulting to DEFAULTS)."""
    s = {**DEFAULTS, **settings}
    ops().configure(s["device"], s["workers"], s["order"], s["seed"], s["execute"])


def info() -> dict:
    return json.loads(ops().info())


@contextlib.contextmanager
def launch_log():
    """Collects the launches inside the block: yields a list that is filled on exit, one dict per
    launch (kernel, grid, block, dynamic_smem, registers, static_smem, blocks_per_sm, ...)."""
    log = []
    ops().cuda_launch_log(True)
    try:
        yield log
    finally:
        log.extend(json.loads(ops().cuda_launch_log(False)))


def kernel_family(name: str) -> str:
    """'grad_ext::cuda::table_backward_kernel<float, 2, 2, true>' -> 'table_backward_kernel<true>'
    for the table kernel (whether it computes the grid gradient), else the bare name."""
    base = re.sub(r"<.*", "", name).split("::")[-1]
    if base == "table_backward_kernel":
        return f"{base}<{name.rstrip('>').split(', ')[-1]}>"
    return base


def families(log) -> set:
    return {kernel_family(r["kernel"]) for r in log}


def sample_grid(op, table, grid, mode="bilinear", padding="zeros", align=False, jitter=None):
    """op (torch.ops.grad_ext or the emulation's) sample_grid; jitter = (std, prob, mode, seed)."""
    std, prob, jmode, seed = jitter or (0.0, 0.0, "pixel", None)
    return op.sample_grid(table, grid, INTERPOLATIONS[mode], PADDINGS[padding], align, std, prob,
                          JITTER_MODES[jmode], seed)


def sample_grid_backward(op, gout, table, grid, mode="bilinear", padding="zeros", align=False, jitter=None,
                         need_input=True, need_grid=True):
    std, prob, jmode, seed = jitter or (0.0, 0.0, "pixel", None)
    return op.sample_grid_backward(gout, table, grid, INTERPOLATIONS[mode], PADDINGS[padding], align, std, prob,
                                   JITTER_MODES[jmode], seed, need_input, need_grid)
