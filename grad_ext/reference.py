"""Pure-torch versions of every grad_ext op: the formulations the kernels replace.

They are written independently of the kernels (torch ops only, autograd for gradients) and
serve as the ground truth in tests and the baseline in benchmarks.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def jitter_grid(grid: Tensor, noise: Tensor) -> Tensor:
    """``grid`` (N, *out, d) plus ``noise`` (N * prod(out), d), as the jittered kernels see it."""
    return grid + noise.to(grid.dtype).reshape(grid.shape)


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False, noise: Optional[Tensor] = None) -> Tensor:
    """Reference of :func:`grad_ext.grid_sample`: F.grid_sample for 2-D and 3-D tables (the table
    repeated over the batch when shared, as the GRAD reference code does), the explicit
    multilinear gather :func:`multilinear_sample` for 1-D and 4-D. ``noise`` is added to the grid
    first (see :func:`grad_ext.jitter_noise`)."""
    if noise is not None:
        grid = jitter_grid(grid, noise)
    d = input.dim() - 2
    if d in (2, 3):
        if input.shape[0] == 1 and grid.shape[0] != 1:
            input = input.repeat(grid.shape[0], *([1] * (input.dim() - 1)))
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return multilinear_sample(input, grid, mode, padding_mode, align_corners)


def _source_index(coord: Tensor, size: int, padding_mode: str, align_corners: bool) -> Tensor:
    if align_corners:
        x = (coord + 1) / 2 * (size - 1)
    else:
        x = ((coord + 1) * size - 1) / 2
    if padding_mode == "reflection":
        low, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
        if span <= 0:
            x = torch.zeros_like(x)
        else:
            y = (x - low).abs()
            flips = torch.floor(y / span)
            extra = y - flips * span
            x = torch.where(torch.remainder(flips, 2) == 0, extra + low, span - extra + low)
    if padding_mode in ("border", "reflection"):
        x = x.clamp(0, size - 1)
    return x


def multilinear_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> Tensor:
    """Explicit multilinear (or nearest) interpolation for any table dimension d.

    input (N_in, C, S_1..S_d) with N_in in {1, N}; grid (N, *out, d) -> (N, C, *out). Corners
    outside the table contribute zero; differentiable through torch autograd."""
    n, c = grid.shape[0], input.shape[1]
    d = input.dim() - 2
    sizes = list(input.shape[2:])
    out_shape = grid.shape[1:-1]
    table = input.reshape(input.shape[0], c, -1)
    if table.shape[0] == 1:
        table = table.expand(n, c, table.shape[2])
    pts = grid.reshape(n, -1, d)
    # grid component k addresses table axis d-1-k
    xs = [_source_index(pts[..., d - 1 - a], sizes[a], padding_mode, align_corners) for a in range(d)]
    strides = [1] * d
    for a in range(d - 2, -1, -1):
        strides[a] = strides[a + 1] * sizes[a + 1]

    def gather(idx: list, weight: Tensor) -> Tensor:
        inside = torch.ones_like(weight, dtype=torch.bool)
        flat = torch.zeros_like(idx[0])
        for a in range(d):
            inside &= (idx[a] >= 0) & (idx[a] < sizes[a])
            flat = flat + idx[a].clamp(0, sizes[a] - 1) * strides[a]
        vals = torch.gather(table, 2, flat.unsqueeze(1).expand(n, c, flat.shape[1]))
        return vals * (weight * inside).unsqueeze(1)

    if mode == "nearest":
        idx = [torch.round(x).long() for x in xs]  # round half to even, like F.grid_sample
        out = gather(idx, torch.ones_like(xs[0]))
    elif mode == "bilinear":
        lows = [torch.floor(x) for x in xs]
        fracs = [x - lo for x, lo in zip(xs, lows)]
        out = 0
        for corner in itertools.product((0, 1), repeat=d):
            weight = torch.ones_like(xs[0])
            for a, hi in enumerate(corner):
                weight = weight * (fracs[a] if hi else 1 - fracs[a])
            idx = [lows[a].long() + hi for a, hi in enumerate(corner)]
            out = out + gather(idx, weight)
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return out.reshape(n, c, *out_shape)


def refine(rec: Tensor, feat: Tensor, mse_weight: float, cos_weight: float, mse_threshold: float):
    """Reference of :func:`grad_ext.refine`, written as GRAD's refinement reads in the spec.

    rec, feat (B, C, H, W) -> (sim (B, H, W), anomaly_map (B, H, W), loss (), refined (B, C, H, W)),
    differentiable through torch autograd (the indicator is a comparison, so it has no gradient)."""
    mse = ((rec - feat) ** 2).mean(dim=1)
    indicator = (mse < mse_threshold).to(rec.dtype)
    sim = mse_weight * indicator + cos_weight * F.cosine_similarity(rec, feat, dim=1, eps=1e-8)
    weight = sim.unsqueeze(1)
    refined = weight * feat + (1 - weight) * rec
    anomaly_map = torch.linalg.vector_norm(feat - refined, dim=1)
    loss = ((refined - feat) ** 2).mean()
    return sim, anomaly_map, loss, refined
