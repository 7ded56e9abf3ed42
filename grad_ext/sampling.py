"""Grid sampling: a drop-in for torch.nn.functional.grid_sample (bilinear, nearest and bicubic)
for 1-D to 4-D tables, with batch-shared tables and coordinate jittering inside the kernel.

The op checks its own arguments (csrc/sample_grid.h): this module maps names to the op's
codes and draws jitter seeds."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    INTERPOLATIONS,
    JITTER_MODES,
    PADDINGS,
    JitterNoise,
    call_seed,
    check_tensors,
    choice,
    draw_jitter_seed,
    real,
    seed_tensor,
)
from ._ops import ops

__all__ = ["INTERPOLATIONS", "JITTER_MODES", "PADDINGS", "GridSample", "JitterNoise", "draw_jitter_seed",
           "grid_sample", "jitter_noise"]


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = False, *, jitter_std: float = 0.0, jitter_prob: float = 0.0,
                jitter_mode: str = "pixel", generator: torch.Generator | None = None,
                jitter_seed=None) -> Tensor:
    """Samples ``input`` at the coordinates in ``grid``, like ``F.grid_sample`` and beyond it.

    Args:
        input: (N_in, C, S_1, ..., S_d) with d in 1..4 and N_in equal to N or 1 (one table
            shared by every batch, without a copy). float32, float64, float16 or bfloat16 on
            the CPU and CUDA; the last two are computed in float32 and rounded once.
        grid: (N, O_1, ..., O_d, d) normalised coordinates in [-1, 1] (component 0 addresses
            the last axis S_d, as in F.grid_sample); for d = 1, (N, W_out, 1).
        mode: 'bilinear' (multilinear over 2^d corners), 'nearest' or 'bicubic' (Keys' cubic
            convolution, A = -0.75, over 4^d taps as F.grid_sample's bicubic; d = 1..3, a
            ValueError for d = 4).
        padding_mode: 'zeros', 'border' or 'reflection'.
        align_corners: as in F.grid_sample.
        jitter_std, jitter_prob, jitter_mode: GRAD's training-time jitter. With jitter_std > 0
            and jitter_prob > 0, noise N(0, jitter_std^2) is added to every component of the
            coordinates of a jittered point before interpolation; 'pixel' jitters each point
            with probability jitter_prob, 'batch' the whole call. The coordinate gradient is
            the gradient at the jittered point.
        generator: draws the call's jitter seed (torch's default generator when None).
        jitter_seed: (seed, offset) or an int64 tensor of 2 elements: the Philox key of the
            noise, drawn inside the kernel (:func:`jitter_noise` returns it).

    Returns:
        (N, C, O_1, ..., O_d) in the inputs' dtype; differentiable with respect to input and grid.
    """
    check_tensors(input=input, grid=grid)
    interpolation = choice("mode", mode, INTERPOLATIONS)
    padding = choice("padding_mode", padding_mode, PADDINGS)
    jmode = choice("jitter_mode", jitter_mode, JITTER_MODES)
    jitter_std, jitter_prob = real("jitter_std", jitter_std), real("jitter_prob", jitter_prob)
    seed = call_seed(jitter_std, jitter_prob, jitter_seed, generator, input.device)
    return ops.sample_grid(input, grid, interpolation, padding, bool(align_corners), jitter_std, jitter_prob, jmode,
                           seed)


def jitter_noise(jitter_seed, num_points: int, dim: int, jitter_std: float, jitter_prob: float,
                 jitter_mode: str = "pixel", device: str | torch.device = "cpu") -> JitterNoise:
    """The noise that ``grid_sample`` adds for ``jitter_seed`` to each of ``num_points`` points.

    Args:
        jitter_seed: (seed, offset) or an int64 tensor of 2 elements.
        num_points: points of the call: the grid flattened to (N * O_1 * ... * O_d, dim).
        dim: coordinates per point, 1 to 4.
        jitter_std, jitter_prob, jitter_mode: as in :func:`grid_sample`.
        device: where to draw it ('cpu' or a CUDA device; both draw the same values).

    Returns:
        JitterNoise(noise (num_points, dim) float32, jittered (num_points,) bool).
    """
    jmode = choice("jitter_mode", jitter_mode, JITTER_MODES)
    seed = seed_tensor(jitter_seed, device)
    noise, flags = ops.jitter_noise(seed, int(num_points), int(dim), real("jitter_std", jitter_std),
                                    real("jitter_prob", jitter_prob), jmode)
    return JitterNoise(noise, flags)


class GridSample(nn.Module):
    """Module form of :func:`grid_sample`: ``GridSample(mode, padding_mode, align_corners)(input, grid)``."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False):
        super().__init__()
        choice("mode", mode, INTERPOLATIONS)
        choice("padding_mode", padding_mode, PADDINGS)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, bool(align_corners)

    def forward(self, input: Tensor, grid: Tensor) -> Tensor:
        """input (N_in, C, S_1..S_d), grid (N, O_1..O_d, d) -> (N, C, O_1..O_d)."""
        return grid_sample(input, grid, self.mode, self.padding_mode, self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"
