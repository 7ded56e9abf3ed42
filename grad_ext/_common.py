"""What the kernels' API and the pure-torch reference share: argument names and their codes,
defaults, result types and jitter seeds. Nothing here loads the compiled library."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

# The op's integer codes (csrc/grid_common.h, csrc/sample_grid.h).
INTERPOLATIONS = {"bilinear": 0, "nearest": 1, "bicubic": 2}  # torch.grid_sampler's codes too
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
JITTER_MODES = {"pixel": 0, "batch": 1}
# Tables of 1 to this many dimensions (the kernels' dispatch_dim in csrc/host_common.h).
MAX_TABLE_DIM = 4
# How grad_ext.onnx expresses a grid lookup in ONNX (its module docstring); here so that callers
# can offer the choice without importing the optional ONNX tools.
SAMPLERS = ("auto", "gridsample", "gather", "matmul")

# GRAD's refinement constants (docs/method.md §2): λ_mse, λ_cos and the MSE threshold k.
MSE_WEIGHT = 0.3
COS_WEIGHT = 0.7
MSE_THRESHOLD = 10.0
# The eps of torch.nn.functional.cosine_similarity that the cosine term uses (fixed in the kernel).
COSINE_EPS = 1e-8


class JitterNoise(NamedTuple):
    """The jitter of a call: ``noise`` (num_points, dim) float32, already scaled by jitter_std
    and 0 where not jittered; ``jittered`` (num_points,) bool."""

    noise: Tensor
    jittered: Tensor


class RefineOutput(NamedTuple):
    """Outputs of :func:`grad_ext.refine` for inputs of shape (B, C, H, W)."""

    sim: Tensor                # (B, H, W) similarity; can be negative
    anomaly_map: Tensor        # (B, H, W) ||feat - refined|| over channels
    loss: Tensor               # () mean of (refined - feat)^2 over B, C, H, W
    refined: Tensor | None     # (B, C, H, W) when return_refined, else None


def choice(name: str, value: str, table: dict) -> int:
    """The integer code of ``value`` in ``table``; ValueError naming ``name`` otherwise."""
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def real(name: str, value) -> float:
    """``value`` as a float; TypeError naming ``name`` when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_tensors(**tensors) -> None:
    """TypeError naming the first argument that is not a tensor (the op's own checks cover
    everything else about them)."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def jitter_requested(jitter_std: float, jitter_prob: float) -> bool:
    """Whether a call with these settings jitters (both must be positive)."""
    return jitter_std > 0 and jitter_prob > 0


def draw_jitter_seed(device: str | torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A fresh ``[seed, offset]`` int64 tensor of shape (2,) on ``device``, drawn from ``generator``
    (torch's default generator of the generator's device when None), so torch.manual_seed makes
    jittered calls reproducible."""
    gen_device = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device)


def seed_tensor(jitter_seed, device: str | torch.device) -> Tensor:
    """``jitter_seed`` ((seed, offset) ints, or a tensor) as a tensor on ``device``; the op checks
    its dtype and size."""
    if isinstance(jitter_seed, Tensor):
        return jitter_seed.reshape(-1).to(device)
    if isinstance(jitter_seed, Sequence) and len(jitter_seed) == 2 and all(isinstance(v, int) for v in jitter_seed):
        return torch.tensor(list(jitter_seed), dtype=torch.int64, device=device)
    raise ValueError(f"jitter_seed must be a (seed, offset) pair of ints or an int64 tensor, got {jitter_seed!r}")


def call_seed(jitter_std: float, jitter_prob: float, jitter_seed, generator: torch.Generator | None,
              device: str | torch.device) -> Tensor | None:
    """The seed tensor of a grid_sample call: None without jitter, else ``jitter_seed`` or a
    fresh one drawn from ``generator``."""
    if not jitter_requested(jitter_std, jitter_prob):
        return None
    if jitter_seed is not None:
        return seed_tensor(jitter_seed, device)
    return draw_jitter_seed(device, generator)
