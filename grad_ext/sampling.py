"""Grid sampling: a drop-in for torch.nn.functional.grid_sample, for 1-D to 4-D tables,
with batch-shared tables and coordinate jittering inside the kernel."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._ops import ops

INTERPOLATIONS = {"bilinear": 0, "nearest": 1}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
JITTER_MODES = {"pixel": 0, "batch": 1}
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _choice(name: str, value: str, table: dict) -> int:
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def _check_sampling_args(input: Tensor, grid: Tensor) -> None:
    if not isinstance(input, Tensor) or not isinstance(grid, Tensor):
        raise TypeError(f"input and grid must be tensors, got {type(input).__name__} and {type(grid).__name__}")
    if not 3 <= input.dim() <= 6:
        raise ValueError(f"input must have shape (N, C, S_1[, ..., S_4]): 3 to 6 dimensions, got {tuple(input.shape)}")
    d = input.dim() - 2
    if grid.dim() != d + 2:
        raise ValueError(f"grid must have {d + 2} dimensions (N, *out, {d}) for a {input.dim()}-D input, "
                         f"got {tuple(grid.shape)}")
    if grid.shape[-1] != d:
        raise ValueError(f"grid's last dimension must be {d} for a {input.dim()}-D input, got shape {tuple(grid.shape)}")
    if input.shape[0] not in (1, grid.shape[0]):
        raise ValueError(f"input batch must be 1 (shared) or equal grid batch {grid.shape[0]}, "
                         f"got input shape {tuple(input.shape)}")
    if not input.is_floating_point() or not grid.is_floating_point():
        raise TypeError(f"input and grid must be floating point, got {input.dtype} and {grid.dtype}")
    if input.dtype != grid.dtype:
        raise TypeError(f"input and grid must have the same dtype, got {input.dtype} and {grid.dtype}")
    if input.device != grid.device:
        raise ValueError(f"input and grid must be on the same device, got {input.device} and {grid.device}")
    allowed = _CUDA_DTYPES if input.device.type == "cuda" else _CPU_DTYPES
    if input.dtype not in allowed:
        raise TypeError(f"input dtype {input.dtype} is not supported on {input.device.type}; use one of {allowed}")


def draw_jitter_seed(device: Union[str, torch.device], generator: Optional[torch.Generator] = None) -> Tensor:
    """A fresh ``[seed, offset]`` int64 tensor of shape (2,) on ``device``, drawn from ``generator``
    (torch's default generator of the generator's device when None), so torch.manual_seed makes
    jittered calls reproducible."""
    gen_device = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device)


def _jitter_seed_tensor(jitter_seed, device) -> Tensor:
    if isinstance(jitter_seed, Tensor):
        if jitter_seed.dtype != torch.int64 or jitter_seed.numel() != 2:
            raise ValueError(f"jitter_seed must be an int64 tensor [seed, offset], got {jitter_seed.dtype} "
                             f"with {jitter_seed.numel()} elements")
        return jitter_seed.reshape(2).to(device)
    if isinstance(jitter_seed, Sequence) and len(jitter_seed) == 2 and all(isinstance(v, int) for v in jitter_seed):
        return torch.tensor(list(jitter_seed), dtype=torch.int64, device=device)
    raise ValueError(f"jitter_seed must be a (seed, offset) pair of ints or an int64 tensor, got {jitter_seed!r}")


def _check_jitter(jitter_std: float, jitter_prob: float) -> None:
    if not jitter_std >= 0:
        raise ValueError(f"jitter_std must be >= 0, got {jitter_std}")
    if not 0 <= jitter_prob <= 1:
        raise ValueError(f"jitter_prob must be in [0, 1], got {jitter_prob}")


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: Optional[bool] = False, *, jitter_std: float = 0.0, jitter_prob: float = 0.0,
                jitter_mode: str = "pixel", generator: Optional[torch.Generator] = None,
                jitter_seed=None) -> Tensor:
    """Samples ``input`` at the coordinates in ``grid``, like ``F.grid_sample`` and beyond it.

    Shapes: ``input`` (N_in, C, S_1, ..., S_d) with d in 1..4 and N_in equal to N or 1 (one
    table shared by every batch, without a copy); ``grid`` (N, O_1, ..., O_d, d) with values in
    [-1, 1] (component 0 addresses the last axis S_d, as in F.grid_sample);
    output (N, C, O_1, ..., O_d). For d = 1 the grid is (N, W_out, 1).

    mode: 'bilinear' (multilinear over 2^d corners) or 'nearest'. padding_mode: 'zeros',
    'border' or 'reflection'. float32/float64 on CPU; also float16/bfloat16 on CUDA, computed
    with float32 accumulation. Differentiable with respect to input and grid.

    Jitter (training-time augmentation of GRAD): with jitter_std > 0 and jitter_prob > 0,
    noise N(0, jitter_std^2) is added to every component of the coordinates of a jittered point
    before interpolation; jitter_mode 'pixel' jitters each point with probability jitter_prob,
    'batch' jitters the whole call with probability jitter_prob. The noise is drawn inside the
    kernel by Philox from ``jitter_seed`` ((seed, offset) or an int64 tensor), which is drawn
    from ``generator`` (or torch's default generator) when not given. ``jitter_noise`` returns
    the noise a call uses. The coordinate gradient is the gradient at the jittered point.
    """
    _check_sampling_args(input, grid)
    interpolation = _choice("mode", mode, INTERPOLATIONS)
    padding = _choice("padding_mode", padding_mode, PADDINGS)
    jmode = _choice("jitter_mode", jitter_mode, JITTER_MODES)
    _check_jitter(jitter_std, jitter_prob)
    seed = None
    if jitter_std > 0 and jitter_prob > 0:
        seed = (_jitter_seed_tensor(jitter_seed, input.device) if jitter_seed is not None
                else draw_jitter_seed(input.device, generator))
    return ops.sample_grid(input, grid, interpolation, padding, bool(align_corners), float(jitter_std),
                           float(jitter_prob), jmode, seed)


class JitterNoise(NamedTuple):
    noise: Tensor     # (num_points, dim) float32, already scaled by jitter_std; 0 where not jittered
    jittered: Tensor  # (num_points,) bool


def jitter_noise(jitter_seed, num_points: int, dim: int, jitter_std: float, jitter_prob: float,
                 jitter_mode: str = "pixel", device: Union[str, torch.device] = "cpu") -> JitterNoise:
    """The noise that ``grid_sample`` adds for ``jitter_seed`` to each of ``num_points`` points
    (the grid flattened to (N * O_1 * ... * O_d, dim)), and which points it jitters."""
    _check_jitter(jitter_std, jitter_prob)
    jmode = _choice("jitter_mode", jitter_mode, JITTER_MODES)
    if not 1 <= dim <= 4:
        raise ValueError(f"dim must be 1 to 4, got {dim}")
    seed = _jitter_seed_tensor(jitter_seed, device)
    noise, flags = ops.jitter_noise(seed, int(num_points), int(dim), float(jitter_std), float(jitter_prob), jmode)
    return JitterNoise(noise, flags)


class GridSample(nn.Module):
    """Module form of :func:`grid_sample`: ``GridSample(mode, padding_mode, align_corners)(input, grid)``."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False):
        super().__init__()
        _choice("mode", mode, INTERPOLATIONS)
        _choice("padding_mode", padding_mode, PADDINGS)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, bool(align_corners)

    def forward(self, input: Tensor, grid: Tensor) -> Tensor:
        return grid_sample(input, grid, self.mode, self.padding_mode, self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"
